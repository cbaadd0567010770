"""The CPU inference path: a fused gather-GEMV that reads z tile by tile and never writes W.

For a few rows (decode, short prompts) building W costs far more than the product: the PyTorch path
writes and reads back ``rows x cols`` weights per call, where the product itself needs only one pass
over them. Here one small C++ loop, compiled once per machine with the system's C++ compiler and
parallelised with OpenMP over tile rows, reads each mapping tile straight from its aligned span of z
(the tile tables of :class:`hf_roast.mapping.LayerMapping`: slot and ``lambda * tile sign``) and
reduces it against every input row while it sits in L1. The only per-call allocation is the output.

Element signs and the HashedNet mapper need the mapping formulas inside the loop. They are not written
again here: :func:`c_formulas` translates the Python functions of :func:`hf_roast.mapping.formula_functions`
into C (the way ``hf_roast.backends.triton.mapping_jit`` recompiles them for Triton), and the tests check both
paths read bit-identical weights. Weights are rounded into the activation dtype exactly as the PyTorch
path rounds them (``(z * lambda * sign).to(dtype)``), and accumulated in fp32.

z may be fp32, bf16 or fp16 (a 16-bit z multiplies in its own dtype first, as the PyTorch path does), or
packed (``RoastConfig.z_bits`` 8 or 4, :class:`hf_roast.quant.QuantizedZ`): each slot tile's int8 or 4-bit
codes are dequantised into an fp32 tile buffer as the tile is read, ``code * scale`` of its group, with
the element formulas of :func:`hf_roast.quant.formula_functions` (where a code is stored, which nibble,
its group) translated to C as well; nothing z-sized or W-sized is built. Quantisation-aware training (an
fp32 master read through its grid) is not read here: :mod:`hf_roast.dispatch` keeps it on the PyTorch path.

Forward only, no autograd: :mod:`hf_roast.dispatch` sends only calls that need no gradient here.
Compiled libraries are cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``, as
``torch.utils.cpp_extension`` caches its builds), keyed by the source, the flags, the compiler and the
CPU, so a second process loads the library in milliseconds. Without a C++ compiler,
:func:`unavailable_reason` says so (and :mod:`hf_roast.dispatch` warns once and keeps the PyTorch path).
"""

from __future__ import annotations

import ast
import ctypes
import hashlib
import inspect
import os
import shutil
import subprocess
import tempfile
import textwrap
import threading
from pathlib import Path

import torch

from . import quant
from .mapping import LayerMapping, formula_constants, formula_functions, seed_constants
from .quant import QuantizedZ

CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Activation dtypes the kernel takes (it computes in fp32 and rounds W into them), and the float dtypes of z
it reads (besides a packed z: int8 or 4-bit codes and their group scales)."""
MAX_ROWS = 16
"""Most rows (batch x sequence) a call may have on this path: above it the PyTorch path's W build is
amortised over enough rows that its GEMM wins (measured: see README "Speed")."""
PARALLEL_GRAIN = 1 << 18
"""Multiply-adds per thread below which a call runs on one thread. SmolLM2's k/v projections (110K
multiply-adds) run on one thread, where a fork/join would cost more than it saves; its other layers
(330K-885K) use torch's thread count. The loop runs in torch's own OpenMP pool (the library links the
libgomp torch loaded), whose threads are still spinning from torch's previous op. Measured with
``hf-roast bench --generate --threads 2`` on an idle 2-core machine: 16x decode 1.07x dense with one
thread per call, 1.07-1.2x with this grain; on a machine busy with other jobs a fork/join can wait a whole
scheduler slice, so there fewer threads (``torch.set_num_threads``) are faster."""
_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# --------------------------------------------------------------------------------------------------
# The formulas, translated from hf_roast.mapping (never written by hand).
# --------------------------------------------------------------------------------------------------
_C_OPS = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Mod: "%",  # C truncates where Python floors: equal on the non-negative values the formulas take
    ast.FloorDiv: "/",
    ast.RShift: ">>",
    ast.BitXor: "^",
    ast.BitAnd: "&",
}


def _c_expr(node: ast.AST, constants: dict[str, int], functions: set[str], where: str) -> str:
    if isinstance(node, ast.BinOp) and type(node.op) in _C_OPS:
        left = _c_expr(node.left, constants, functions, where)
        right = _c_expr(node.right, constants, functions, where)
        return f"({left} {_C_OPS[type(node.op)]} {right})"
    if (
        isinstance(node, ast.Compare)
        and len(node.ops) == 1
        and isinstance(node.ops[0], ast.Eq)
        and len(node.comparators) == 1
    ):
        left = _c_expr(node.left, constants, functions, where)
        right = _c_expr(node.comparators[0], constants, functions, where)
        return f"({left} == {right})"
    if isinstance(node, ast.Name):
        if node.id in constants:
            return f"INT64_C({constants[node.id]})"
        return node.id
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return f"INT64_C({node.value})"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in functions:
        args = ", ".join(_c_expr(a, constants, functions, where) for a in node.args)
        return f"{node.func.id}({args})"
    raise NotImplementedError(
        f"hf_roast.cpu_path cannot translate {ast.dump(node)[:80]} in {where} to C; extend _c_expr."
    )


def _c_statements(
    body: list[ast.stmt],
    params: set[str],
    local: set[str],
    constants,
    done: set[str],
    where: str,
    indent: str,
    ctype: str,
) -> list[str]:
    """Assignments (of ``ctype`` locals), returns and ``if`` blocks (whose bodies only return or branch) as C."""
    lines = []
    for stmt in body:
        if (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and indent == "  "
        ):
            name = stmt.targets[0].id
            decl = "" if name in local or name in params else f"{ctype} "
            local.add(name)
            lines.append(f"{indent}{decl}{name} = {_c_expr(stmt.value, constants, done, where)};")
        elif isinstance(stmt, ast.Return) and stmt.value is not None:
            lines.append(f"{indent}return {_c_expr(stmt.value, constants, done, where)};")
        elif isinstance(stmt, ast.If):
            lines.append(f"{indent}if ({_c_expr(stmt.test, constants, done, where)}) {{")
            lines += _c_statements(stmt.body, params, local, constants, done, where, indent + "  ", ctype)
            if stmt.orelse:
                lines.append(f"{indent}}} else {{")
                lines += _c_statements(
                    stmt.orelse, params, local, constants, done, where, indent + "  ", ctype
                )
            lines.append(f"{indent}}}")
        else:
            raise NotImplementedError(f"hf_roast.cpu_path cannot translate a statement of {where}.")
    return lines


def _translate(functions, constants: dict[str, int], module: str, float_functions=frozenset()) -> str:
    """Python formulas as C functions: ``int64_t`` arguments and result, or ``float`` for ``float_functions``
    (the dequantisation's ``code * scale``). Formulas returning a tuple (tile coordinates) are left out:
    the kernel's loops walk tiles and elements in that very order. Anything the translator does not know
    raises, so a changed formula cannot be mistranslated silently."""
    done: set[str] = set()
    out = []
    for fn in functions:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        fdef = tree.body[0]
        assert isinstance(fdef, ast.FunctionDef)
        body = [s for s in fdef.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        if any(isinstance(s, ast.Return) and isinstance(s.value, ast.Tuple) for s in body):
            continue
        ctype = "float" if fdef.name in float_functions else "int64_t"
        params = {a.arg for a in fdef.args.args}
        signature = ", ".join(f"{ctype} {a.arg}" for a in fdef.args.args)
        where = f"{module}.{fdef.name}"
        lines = _c_statements(body, params, set(), constants, done, where, "  ", ctype)
        out.append(f"static inline {ctype} {fdef.name}({signature}) {{\n" + "\n".join(lines) + "\n}")
        done.add(fdef.name)
    return "\n".join(out)


def c_formulas() -> str:
    """The scalar formulas of :func:`hf_roast.mapping.formula_functions` (slots, signs) and of
    :func:`hf_roast.quant.formula_functions` (where a packed code is stored, its group, its signed value,
    its dequantisation) as C functions, translated from their Python source."""
    mapping_c = _translate(formula_functions(), formula_constants(), "mapping")
    quant_c = _translate(
        quant.formula_functions(), quant.formula_constants(), "quant", frozenset({"dequantize_value"})
    )
    return mapping_c + "\n" + quant_c


# --------------------------------------------------------------------------------------------------
# The kernel.
# --------------------------------------------------------------------------------------------------
_KERNEL = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

/* One value rounded into a float dtype (R: 0 fp32, 1 bf16, 2 fp16) as the PyTorch path's .to(dtype) does,
   kept as fp32. Branch-free, so that the loops calling it vectorise. */
template <int R>
static inline float round_to(float w) {
  if (R == 1) { /* bfloat16, round to nearest even; NaN stays NaN */
    uint32_t u; memcpy(&u, &w, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    r = ((u & 0x7fffffffu) > 0x7f800000u) ? u : r;
    memcpy(&w, &r, 4);
    return w;
  }
  if (R == 2) return (float)(_Float16)w;
  return w;
}

/* z's storage: fp32, bf16 or fp16 floats (zkind 0, 1, 2), or packed codes and group scales (bits 8, 4). */
struct Z {
  const void* data; int64_t zkind;                            /* float z */
  const void* codes; const float* scales; int64_t bits, group;  /* packed z (bits 0: float) */
};

/* The stored unit of a packed z: int8 codes at 8 bits, bytes of two nibbles at 4 (QuantizedZ.codes_dtype). */
template <int BITS> struct Code { typedef uint8_t type; };
template <> struct Code<8> { typedef int8_t type; };

/* z[index] of a packed z, in fp32: quant.py's element formulas, translated above. A code fits in 32 bits. */
template <int BITS>
static inline float packed_value(const typename Code<BITS>::type* __restrict codes, int64_t index, float scale) {
  const int64_t raw = codes[storage_index(index, BITS)];
  return dequantize_value((float)(int32_t)code_of(raw, index, BITS), scale);
}

/* z[start + k] for k < n of a packed z, in fp32, with each group's scale read once. At 4 bits the values
   go by pairs from an even index (one byte), so that the nibble each reads is known to the compiler. */
template <int BITS>
static void dequantize_span(const Z& z, int64_t start, int64_t n, float* out) {
  const typename Code<BITS>::type* __restrict codes = (const typename Code<BITS>::type*)z.codes;
  const float* scales = z.scales;
  const int64_t group = z.group;
  int64_t k = 0;
  while (k < n) {
    const int64_t g = group_of(start + k, group);
    const float scale = scales[g];
    int64_t end = (g + 1) * group - start; /* first value of the next group (groups are contiguous) */
    if (end > n) end = n;
    if (BITS == 4) {
      if (k < end && ((start + k) & 1)) { out[k] = packed_value<BITS>(codes, start + k, scale); k++; }
      const int64_t half = (start + k) / 2, pairs = (end - k) / 2;
      const typename Code<BITS>::type* __restrict bytes = codes + storage_index(start + k, BITS);
      float* __restrict o = out + k;
      for (int64_t p = 0; p < pairs; p++) {
        const int64_t even = 2 * (half + p), raw = bytes[p]; /* bytes[p]: storage_index(even, BITS) */
        o[2 * p] = dequantize_value((float)(int32_t)code_of(raw, even, BITS), scale);
        o[2 * p + 1] = dequantize_value((float)(int32_t)code_of(raw, even + 1, BITS), scale);
      }
      k += 2 * pairs;
    }
    for (; k < end; k++) out[k] = packed_value<BITS>(codes, start + k, scale);
  }
}

/* z[start : start + n] as fp32 values (exact for every storage: floats widen, codes dequantise). */
static void read_span(const Z& z, int64_t start, int64_t n, float* out) {
  if (z.bits == 8) { dequantize_span<8>(z, start, n, out); return; }
  if (z.bits == 4) { dequantize_span<4>(z, start, n, out); return; }
  if (z.zkind == 0) { memcpy(out, (const float*)z.data + start, n * sizeof(float)); return; }
  const uint16_t* h = (const uint16_t*)z.data + start;
  if (z.zkind == 1) {
    for (int64_t k = 0; k < n; k++) { const uint32_t u = (uint32_t)h[k] << 16; memcpy(out + k, &u, 4); }
  } else {
    for (int64_t k = 0; k < n; k++) { _Float16 f; memcpy(&f, h + k, 2); out[k] = (float)f; }
  }
}

/* One value z[index] (hashednet reads element by element). */
static inline float read_one(const Z& z, int64_t index) {
  if (z.bits == 8) return packed_value<8>((const int8_t*)z.codes, index, z.scales[group_of(index, z.group)]);
  if (z.bits == 4) return packed_value<4>((const uint8_t*)z.codes, index, z.scales[group_of(index, z.group)]);
  if (z.zkind == 0) return ((const float*)z.data)[index];
  float v;
  read_span(z, index, 1, &v);
  return v;
}

extern "C" int hf_roast_dequantize(const void* codes, const float* scales, int64_t bits, int64_t group,
                                   int64_t start, int64_t n, float* out) {
  if (bits != 8 && bits != 4) return 1;
  Z z = {nullptr, 0, codes, scales, bits, group};
  read_span(z, start, n, out);
  return 0;
}

struct Args {
  const float* x; int64_t n_rows; int64_t cols;      /* x: n_rows x cols, fp32, contiguous */
  Z z;
  const int64_t* tile_slot; const float* tile_scale;  /* LayerMapping tables (tile_slot NULL: hashednet) */
  int64_t rows, tr, tc, n_tr, n_tc;
  int64_t build;        /* 0: read fp32 z tiles directly (scale after the dot); 1: build each tile first */
  int64_t rounding;     /* 0 fp32, 1 bf16, 2 fp16 */
  int64_t element_sign, tile_offset, segment_start, segment_size;
  int64_t slot_a, slot_b, sign_a, sign_b;
  const float* bias;    /* NULL or rows floats */
  float* y;             /* n_rows x rows */
  int64_t threads;
};

/* The trh x tcw weights of one tile, as the PyTorch path computes them: z * (lambda * tile sign) * element
   sign in z's dtype (ZR: a 16-bit z rounds the scale and the product to its own dtype), then the cast into
   the activation dtype (R). zt: the slot tile's values in fp32 (tile mappers), or NULL (hashednet). */
template <int ZR, int R>
static void build_tile(const Args& A, const float* zt, int64_t local, float s, int64_t trh, int64_t tcw,
                       float* wb, int64_t ld) {
  /* ld: the row stride of wb (the tile's own width in a tile buffer, W's width when writing into W) */
  const int64_t T = A.tr * A.tc;
  const float s_z = round_to<ZR>(s);
  if (zt && !A.element_sign) {
    for (int64_t a = 0; a < trh; a++) {
      const float* za = zt + a * A.tc;
      float* wa = wb + a * ld;
      for (int64_t b = 0; b < tcw; b++) wa[b] = round_to<R>(round_to<ZR>(za[b] * s_z));
    }
    return;
  }
  for (int64_t a = 0; a < trh; a++) {
    for (int64_t b = 0; b < tcw; b++) {
      const int64_t e = a * A.tc + b;
      const int64_t v = virtual_index(local, e, A.tile_offset, T);
      const float zv = zt ? zt[e] : read_one(A.z, hashednet_slot(v, A.segment_start, A.segment_size, A.slot_a, A.slot_b));
      float sc = s_z;
      if (A.element_sign) sc *= (float)hash_sign(v, A.sign_a, A.sign_b);
      wb[a * ld + b] = round_to<R>(round_to<ZR>(zv * sc));
    }
  }
}

typedef void (*BuildFn)(const Args&, const float*, int64_t, float, int64_t, int64_t, float*, int64_t);

static BuildFn build_fn(int64_t zr, int64_t r) {
  static const BuildFn table[3][3] = {
    {build_tile<0, 0>, build_tile<0, 1>, build_tile<0, 2>},
    {build_tile<1, 0>, build_tile<1, 1>, build_tile<1, 2>},
    {build_tile<2, 0>, build_tile<2, 1>, build_tile<2, 2>},
  };
  return table[zr][r];
}

template <int TC>
static void run(const Args& A) {
  const int64_t T = A.tr * A.tc;
  const bool direct_z = A.z.bits == 0 && A.z.zkind == 0; /* fp32 z: tiles are read where they lie */
  const BuildFn build = build_fn(A.z.bits ? 0 : A.z.zkind, A.rounding);
  #pragma omp parallel for schedule(static) num_threads(A.threads)
  for (int64_t i = 0; i < A.n_tr; i++) {
    float acc_stack[16 * 64 * 8];
    float wbuf_stack[64 * 64];
    float ztile_stack[64 * 64];
    const int64_t r0 = i * A.tr;
    const int64_t trh = (A.rows - r0 < A.tr) ? A.rows - r0 : A.tr;
    float* acc = acc_stack;
    for (int64_t k = 0; k < A.n_rows * A.tr * 8; k++) acc[k] = 0.f;
    for (int64_t j = 0; j < A.n_tc; j++) {
      const int64_t c0 = j * A.tc;
      const int64_t tcw = (A.cols - c0 < A.tc) ? A.cols - c0 : A.tc;
      const int64_t local = i * A.n_tc + j;
      const float s = A.tile_scale[local];
      const float* zt = nullptr; /* the slot tile's T values in fp32 (tile mappers) */
      if (A.tile_slot) {
        if (direct_z) zt = (const float*)A.z.data + A.tile_slot[local] * T;
        else { read_span(A.z, A.tile_slot[local] * T, T, ztile_stack); zt = ztile_stack; }
      }
      const float* w;
      float post = s;
      if (!A.build) {
        w = zt;
      } else {
        build(A, zt, local, s, trh, tcw, wbuf_stack, A.tc);
        w = wbuf_stack;
        post = 1.f;
      }
      /* 8 partial sums per output row, kept across the whole tile row: no horizontal sum per tile,
         and the 8-wide inner loop is one vector FMA (AVX2) without reassociating anything. */
      float xs[64];
      const bool full = (TC > 0) && tcw == TC;
      for (int64_t n = 0; n < A.n_rows; n++) {
        const float* xr = A.x + n * A.cols + c0;
        float* an = acc + n * A.tr * 8;
        if (full) {
          for (int b = 0; b < TC; b++) xs[b] = post * xr[b];
          for (int64_t a = 0; a < trh; a++) {
            const float* wa = w + a * TC;
            float* aa = an + a * 8;
            for (int q = 0; q < TC / 8; q++)
              for (int l = 0; l < 8; l++) aa[l] += wa[q * 8 + l] * xs[q * 8 + l];
          }
        } else {
          for (int64_t b = 0; b < tcw; b++) xs[b] = post * xr[b];
          for (int64_t a = 0; a < trh; a++) {
            const float* wa = w + a * A.tc;
            float* aa = an + a * 8;
            for (int64_t b = 0; b < tcw; b++) aa[b & 7] += wa[b] * xs[b];
          }
        }
      }
    }
    for (int64_t n = 0; n < A.n_rows; n++) {
      float* yr = A.y + n * A.rows + r0;
      for (int64_t a = 0; a < trh; a++) {
        const float* aa = acc + (n * A.tr + a) * 8;
        float sum = ((aa[0] + aa[1]) + (aa[2] + aa[3])) + ((aa[4] + aa[5]) + (aa[6] + aa[7]));
        yr[a] = sum + (A.bias ? A.bias[r0 + a] : 0.f);
      }
    }
  }
}

/* W itself, rows x cols row-major fp32 (exactly the PyTorch path's materialize_weight in fp32), for calls
   with many rows: each tile goes from its span of z straight to its place in W, one pass. */
extern "C" int hf_roast_build_weight(const Args* A, float* w) {
  if (A->tr > 64 || A->tc > 64 || A->rounding != 0) return 1;
  if (A->z.bits == 0 && (A->z.zkind < 0 || A->z.zkind > 2)) return 1;
  if (A->z.bits != 0 && A->z.bits != 8 && A->z.bits != 4) return 1;
  const int64_t T = A->tr * A->tc;
  const bool direct_z = A->z.bits == 0 && A->z.zkind == 0;
  const BuildFn build = build_fn(A->z.bits ? 0 : A->z.zkind, 0);
  #pragma omp parallel for schedule(static) num_threads(A->threads)
  for (int64_t i = 0; i < A->n_tr; i++) {
    float ztile_stack[64 * 64];
    const int64_t r0 = i * A->tr;
    const int64_t trh = (A->rows - r0 < A->tr) ? A->rows - r0 : A->tr;
    for (int64_t j = 0; j < A->n_tc; j++) {
      const int64_t c0 = j * A->tc;
      const int64_t tcw = (A->cols - c0 < A->tc) ? A->cols - c0 : A->tc;
      const int64_t local = i * A->n_tc + j;
      const float* zt = nullptr;
      if (A->tile_slot) {
        if (direct_z) zt = (const float*)A->z.data + A->tile_slot[local] * T;
        else { read_span(A->z, A->tile_slot[local] * T, T, ztile_stack); zt = ztile_stack; }
      }
      build(*A, zt, local, A->tile_scale[local], trh, tcw, w + r0 * A->cols + c0, A->cols);
    }
  }
  return 0;
}

extern "C" int hf_roast_gemv(const Args* A) {
  if (A->tr > 64 || A->tc > 64 || A->n_rows > 16 || A->rounding < 0 || A->rounding > 2) return 1;
  if (A->z.bits == 0 && (A->z.zkind < 0 || A->z.zkind > 2)) return 1;
  if (A->z.bits != 0 && A->z.bits != 8 && A->z.bits != 4) return 1;
  if (A->tc == 32) run<32>(*A); else if (A->tc == 16) run<16>(*A); else if (A->tc == 64) run<64>(*A); else run<0>(*A);
  return 0;
}
"""
_MAX_TILE = 64  # the kernel's stack buffers: tiles of at most 64 x 64, at most 16 rows (see MAX_ROWS)


class _Z(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("zkind", ctypes.c_int64),
        ("codes", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("bits", ctypes.c_int64),
        ("group", ctypes.c_int64),
    ]


class _Args(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("n_rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("z", _Z),
        ("tile_slot", ctypes.c_void_p),
        ("tile_scale", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("tr", ctypes.c_int64),
        ("tc", ctypes.c_int64),
        ("n_tr", ctypes.c_int64),
        ("n_tc", ctypes.c_int64),
        ("build", ctypes.c_int64),
        ("rounding", ctypes.c_int64),
        ("element_sign", ctypes.c_int64),
        ("tile_offset", ctypes.c_int64),
        ("segment_start", ctypes.c_int64),
        ("segment_size", ctypes.c_int64),
        ("slot_a", ctypes.c_int64),
        ("slot_b", ctypes.c_int64),
        ("sign_a", ctypes.c_int64),
        ("sign_b", ctypes.c_int64),
        ("bias", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("threads", ctypes.c_int64),
    ]


FLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-fno-math-errno",
)


def source() -> str:
    """The complete C++ source the library is compiled from: translated formulas, then the kernel."""
    return "#include <stdint.h>\n" + c_formulas() + "\n" + _KERNEL


def compiler() -> str | None:
    """The C++ compiler to use (``$CXX``, else ``c++`` / ``g++`` / ``clang++`` on PATH), or None."""
    candidates = [os.environ.get("CXX")] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    return None


def build_dir() -> Path:
    """torch's extension cache (``$TORCH_EXTENSIONS_DIR``, else its default root), as cpp_extension uses."""
    from torch.utils.cpp_extension import get_default_build_root

    path = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / "hf_roast_cpu_path"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and flags, so a shared cache never loads foreign code."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


class _Library:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lib = None
        self.error: str | None = None
        self.tried = False
        self.build_seconds = 0.0

    def load(self):
        with self.lock:
            if not self.tried:
                self.tried = True
                try:
                    self.lib = self._load()
                except (OSError, subprocess.SubprocessError, NotImplementedError) as exc:
                    self.error = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
            return self.lib

    def _load(self):
        import time

        cxx = compiler()
        if cxx is None:
            raise OSError("no C++ compiler found (set CXX, or install g++ / clang++)")
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
        src = source()
        key = hashlib.sha256("\0".join([src, " ".join(FLAGS), version, _cpu_key()]).encode()).hexdigest()[:20]
        directory = build_dir()
        target = directory / f"hf_roast_cpu_{key}.so"
        if not target.is_file():
            start = time.perf_counter()
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
            src_path = Path(tmp).with_suffix(".cpp")
            src_path.write_text(src)
            try:
                result = subprocess.run(
                    [cxx, *FLAGS, str(src_path), "-o", tmp], capture_output=True, text=True
                )
                if result.returncode != 0:
                    raise OSError(f"{cxx} failed: {result.stderr[-1500:]}")
                os.replace(tmp, target)  # atomic: concurrent processes never load a half-written file
            finally:
                src_path.unlink(missing_ok=True)
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self.build_seconds = time.perf_counter() - start
        lib = ctypes.CDLL(str(target))
        lib.hf_roast_gemv.argtypes = [ctypes.POINTER(_Args)]
        lib.hf_roast_gemv.restype = ctypes.c_int
        lib.hf_roast_build_weight.argtypes = [ctypes.POINTER(_Args), ctypes.c_void_p]
        lib.hf_roast_build_weight.restype = ctypes.c_int
        lib.hf_roast_dequantize.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_void_p]
        lib.hf_roast_dequantize.restype = ctypes.c_int
        return lib


_library = _Library()


def unavailable_reason() -> str | None:
    """None when the kernel is built (or builds now); otherwise why it cannot be (no compiler, build error)."""
    if _library.lib is not None:  # built: no lock on the per-call path
        return None
    return None if _library.load() is not None else _library.error


def _z_reason(z: torch.Tensor | QuantizedZ) -> str | None:
    """None when the compiled loop can read this z (on CPU; a float dtype, or codes and fp32 scales)."""
    if isinstance(z, QuantizedZ):
        if not z.codes.is_cpu:
            return f"z is on {z.codes.device.type}, and the CPU path runs on CPU tensors"
        if z.codes.dtype != QuantizedZ.codes_dtype(z.bits) or z.scales.dtype != torch.float32:
            want = QuantizedZ.codes_dtype(z.bits)
            return f"the CPU path reads {z.bits}-bit codes as {want} with fp32 scales"
        return None
    if not z.is_cpu:
        return f"z is on {z.device.type}, and the CPU path runs on CPU tensors"
    if z.dtype not in CPU_DTYPES:
        return f"the CPU path reads a float32, bfloat16 or float16 z, not {z.dtype}"
    return None


def _tile_reason(layer_map: LayerMapping) -> str | None:
    tr, tc = layer_map.plan.tile
    if tr > _MAX_TILE or tc > _MAX_TILE:
        return f"the CPU path takes mapping tiles of at most {_MAX_TILE}x{_MAX_TILE}, not {tr}x{tc}"
    return None


def unsupported_reason(x: torch.Tensor, z: torch.Tensor | QuantizedZ, layer_map: LayerMapping) -> str | None:
    """None when this path can run the call; otherwise why not (device, dtypes, rows, tile size)."""
    if not x.is_cpu:
        return f"the tensors are on {x.device.type}, and the CPU path runs on CPU tensors"
    if x.dtype not in CPU_DTYPES:
        return f"the CPU path takes float32, bfloat16 or float16 activations, not {x.dtype}"
    reason = _z_reason(z)
    if reason is not None:
        return reason
    rows = x.numel() // max(1, x.shape[-1])
    if rows > MAX_ROWS:
        return f"the CPU path takes at most {MAX_ROWS} rows per call, not {rows}"
    return _tile_reason(layer_map)


def _z_struct(z: torch.Tensor | QuantizedZ) -> tuple[_Z, tuple[torch.Tensor, ...]]:
    """The kernel's view of z, and the contiguous tensors it points into (kept alive by the caller)."""
    if isinstance(z, QuantizedZ):
        codes, scales = z.codes.contiguous(), z.scales.contiguous()
        return _Z(None, 0, codes.data_ptr(), scales.data_ptr(), z.bits, z.group_size), (codes, scales)
    data = z.detach().contiguous()
    return _Z(data.data_ptr(), _ROUNDING[data.dtype], None, None, 0, 0), (data,)


def dequantize(z: QuantizedZ, start: int = 0, n: int | None = None) -> torch.Tensor:
    """``z[start : start + n]`` dequantised by the kernel's own reader (fp32): what the CPU path computes
    with, exposed so that tests compare it with :meth:`hf_roast.quant.QuantizedZ.values_at` bit for bit."""
    lib = _library.load()
    if lib is None:
        raise RuntimeError(f"The hf-roast CPU kernel is not available: {_library.error}")
    n = z.numel - start if n is None else n
    if start < 0 or n < 0 or start + n > z.numel:
        raise ValueError(f"span [{start}, {start + n}) lies outside z's {z.numel} values")
    codes, scales = z.codes.contiguous(), z.scales.contiguous()
    out = torch.empty(n, dtype=torch.float32)
    status = lib.hf_roast_dequantize(
        codes.data_ptr(), scales.data_ptr(), z.bits, z.group_size, start, n, out.data_ptr()
    )
    if status != 0:
        raise ValueError(f"hf_roast CPU kernel refused z_bits={z.bits}")
    return out


def _prepared_args(
    layer_map: LayerMapping, z: torch.Tensor | QuantizedZ, bias: torch.Tensor | None, dtype: torch.dtype
) -> _Args:
    """The call's constant arguments (pointers to z, the tables and the bias; geometry; hash constants),
    built once per layer and cached on its :class:`LayerMapping`: decode calls every layer once per token,
    and rebuilding them cost more than the GEMV of a small layer. The cache holds the tensors it points
    into (so no pointer outlives its memory) and is keyed by their identity and address (``param.data =
    ...``, as ``Module.to`` does, keeps the Parameter but moves its memory), and by the bias's version when
    the bias is rounded into a copy (bf16/fp16 activations), so an in-place update is never missed.
    """
    stored = (z.codes, z.scales) if isinstance(z, QuantizedZ) else (z, z)  # a packed z is rebuilt per read
    needs_copy = bias is not None and dtype != torch.float32
    key = (
        *stored,
        bias,
        dtype,
        stored[0].data_ptr(),
        stored[1].data_ptr(),
        bias.data_ptr() if bias is not None else 0,
        bias._version if needs_copy else 0,
    )
    cached = layer_map.__dict__.get("_cpu_args")
    if cached is not None and all(a is b for a, b in zip(cached[0][:3], key)) and cached[0][3:] == key[3:]:
        return cached[1]
    spec, plan = layer_map.spec, layer_map.plan
    z_view, keep_alive = _z_struct(z)
    scale = layer_map.tile_scale.contiguous()
    slots = layer_map.tile_slot.contiguous() if plan.is_tiled else None
    b = None
    if bias is not None:
        b = bias.detach().to(dtype).to(torch.float32).contiguous()
    slot_a, slot_b = seed_constants(plan.seed, "slot")
    sign_a, sign_b = seed_constants(plan.seed, "sign")
    rounding = _ROUNDING[dtype]
    element_sign = plan.sign == "element"
    tr, tc = plan.tile
    args = _Args(
        n_rows=0,
        cols=spec.cols,
        z=z_view,
        tile_slot=slots.data_ptr() if slots is not None else None,
        tile_scale=scale.data_ptr(),
        rows=spec.rows,
        tr=tr,
        tc=tc,
        n_tr=spec.n_tile_rows(plan.tile),
        n_tc=spec.n_tile_cols(plan.tile),
        # fp32 weights straight from (dequantised) fp32 tiles unless a sign, a hash or a rounding intervenes
        build=int(rounding != 0 or element_sign or not plan.is_tiled or z_view.zkind != 0),
        rounding=rounding,
        element_sign=int(element_sign),
        tile_offset=spec.tile_offset,
        segment_start=spec.segment_start,
        segment_size=spec.segment_size,
        slot_a=slot_a,
        slot_b=slot_b,
        sign_a=sign_a,
        sign_b=sign_b,
        bias=b.data_ptr() if b is not None else None,
    )
    # the entry holds every tensor the pointers reach, so none is freed while the entry lives
    layer_map.__dict__["_cpu_args"] = (key, args, (b, scale, slots, *keep_alive))
    return args


def cpu_roast_linear(
    x: torch.Tensor, z: torch.Tensor | QuantizedZ, bias: torch.Tensor | None, layer_map: LayerMapping
) -> torch.Tensor:
    """``x W^T + b`` in ``x.dtype`` with W read tile by tile from z (float, or packed codes dequantised as
    they are read); no gradient. Check :func:`unsupported_reason` and :func:`unavailable_reason` first."""
    lib = _library.lib or _library.load()
    if lib is None:
        raise RuntimeError(f"The hf-roast CPU kernel is not available: {_library.error}")
    spec = layer_map.spec
    x2 = x
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    n = x2.numel() // spec.cols
    y = torch.empty(x.shape[:-1] + (spec.rows,), dtype=torch.float32)
    if n == 0:
        return y.to(x.dtype)
    args = _Args.from_buffer_copy(
        _prepared_args(layer_map, z, bias, x.dtype)
    )  # per call: callers never share one
    args.x = x2.data_ptr()
    args.n_rows = n
    args.y = y.data_ptr()
    args.threads = max(1, min(torch.get_num_threads(), n * spec.rows * spec.cols // PARALLEL_GRAIN))
    if lib.hf_roast_gemv(ctypes.byref(args)) != 0:
        raise ValueError(f"hf_roast CPU kernel refused {n} rows with a {args.tr}x{args.tc} tile.")
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def builds_weight(z: torch.Tensor | QuantizedZ, layer_map: LayerMapping, dtype: torch.dtype) -> bool:
    """Whether :func:`build_weight` can build this W: fp32 weights from any z this path reads, on CPU,
    outside torch.compile's tracing (it is opaque to it) and outside quantisation-aware training (whose
    grid the PyTorch path applies), with the library built. No warning when it cannot: the PyTorch path's
    own build then runs, and :mod:`hf_roast.dispatch` already warns once about a missing compiler."""
    if dtype != torch.float32 or layer_map.fake_quant is not None or torch.compiler.is_compiling():
        return False
    return _z_reason(z) is None and _tile_reason(layer_map) is None and unavailable_reason() is None


def build_weight(z: torch.Tensor | QuantizedZ, layer_map: LayerMapping, out: torch.Tensor) -> torch.Tensor:
    """W (``rows x cols``, fp32) into ``out`` in one pass over its tiles: each read from its span of z
    (dequantised if packed), scaled and signed exactly as :func:`hf_roast.torch_path.materialize_weight`
    builds it, and written in place. Used by the PyTorch path on CPU (prefill, training) where
    :func:`builds_weight` allows; the PyTorch path's gather and permuted copy wrote W twice."""
    spec = layer_map.spec
    if out.shape != (spec.rows, spec.cols) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"build_weight needs a contiguous fp32 {spec.rows}x{spec.cols} output.")
    lib = _library.lib or _library.load()
    if lib is None:
        raise RuntimeError(f"The hf-roast CPU kernel is not available: {_library.error}")
    args = _Args.from_buffer_copy(_prepared_args(layer_map, z, None, torch.float32))
    args.threads = max(1, min(torch.get_num_threads(), spec.rows * spec.cols // PARALLEL_GRAIN))
    if lib.hf_roast_build_weight(ctypes.byref(args), out.data_ptr()) != 0:
        raise ValueError(
            f"hf_roast CPU kernel refused to build {spec.name}'s weight ({args.tr}x{args.tc} tile)."
        )
    return out
