"""The CPU inference path: a fused gather-GEMV that reads z tile by tile and never writes W.

For a few rows (decode, short prompts) building W costs far more than the product: the PyTorch path
writes and reads back ``rows x cols`` weights per call, where the product itself needs only one pass
over them. Here one small C++ loop, compiled once per machine with the system's C++ compiler and
parallelised with OpenMP over tile rows, reads each mapping tile straight from its aligned span of z
(the tile tables of :class:`hf_roast.mapping.LayerMapping`: slot and ``lambda * tile sign``) and
reduces it against every input row while it sits in L1. The only per-call allocation is the output.

Element signs and the HashedNet mapper need the mapping formulas inside the loop. They are not written
again here: :func:`c_formulas` translates the Python functions of :func:`hf_roast.mapping.formula_functions`
into C (the way ``hf_roast.kernels.mapping_jit`` recompiles them for Triton), and the tests check both
paths read bit-identical weights. Weights are rounded into the activation dtype exactly as the PyTorch
path rounds them (``(z * lambda * sign).to(dtype)``), and accumulated in fp32.

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

from .mapping import LayerMapping, formula_constants, formula_functions, seed_constants

CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Activation dtypes the kernel takes (it computes in fp32 and rounds W into them). z must be fp32."""
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
        f"hf_roast.cpu_path cannot translate {ast.dump(node)[:80]} in mapping.{where} to C; extend _c_expr."
    )


def c_formulas() -> str:
    """The scalar formulas of :func:`hf_roast.mapping.formula_functions` as C ``int64_t`` functions.

    Formulas returning a tuple (tile coordinates) are left out: the kernel's loops walk tiles and
    elements in that very order. Anything the translator does not know raises, so a changed formula
    cannot be mistranslated silently.
    """
    constants = formula_constants()
    done: set[str] = set()
    out = []
    for fn in formula_functions():
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        fdef = tree.body[0]
        assert isinstance(fdef, ast.FunctionDef)
        body = [s for s in fdef.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        if any(isinstance(s, ast.Return) and isinstance(s.value, ast.Tuple) for s in body):
            continue
        params = ", ".join(f"int64_t {a.arg}" for a in fdef.args.args)
        lines, local = [], set()
        for stmt in body:
            if (
                isinstance(stmt, ast.Assign)
                and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)
            ):
                name = stmt.targets[0].id
                decl = "" if name in local or name in {a.arg for a in fdef.args.args} else "int64_t "
                local.add(name)
                lines.append(f"  {decl}{name} = {_c_expr(stmt.value, constants, done, fdef.name)};")
            elif isinstance(stmt, ast.Return):
                lines.append(f"  return {_c_expr(stmt.value, constants, done, fdef.name)};")
            else:
                raise NotImplementedError(
                    f"hf_roast.cpu_path cannot translate a statement of mapping.{fdef.name}."
                )
        out.append(f"static inline int64_t {fdef.name}({params}) {{\n" + "\n".join(lines) + "\n}")
        done.add(fdef.name)
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# The kernel.
# --------------------------------------------------------------------------------------------------
_KERNEL = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

/* One weight rounded into the activation dtype (what the PyTorch path's .to(dtype) does), kept as fp32. */
static inline float round_to(float w, int rounding) {
  if (rounding == 1) { /* bfloat16, round to nearest even; NaN stays NaN */
    uint32_t u; memcpy(&u, &w, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return w;
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&w, &u, 4);
    return w;
  }
  if (rounding == 2) return (float)(_Float16)w;
  return w;
}

struct Args {
  const float* x; int64_t n_rows; int64_t cols;      /* x: n_rows x cols, fp32, contiguous */
  const float* z;
  const int64_t* tile_slot; const float* tile_scale;  /* LayerMapping tables (tile_slot NULL: hashednet) */
  int64_t rows, tr, tc, n_tr, n_tc;
  int64_t build;        /* 0: read z tiles directly (scale after the dot); 1: build each tile first */
  int64_t rounding;     /* 0 fp32, 1 bf16, 2 fp16 */
  int64_t element_sign, tile_offset, segment_start, segment_size;
  int64_t slot_a, slot_b, sign_a, sign_b;
  const float* bias;    /* NULL or rows floats */
  float* y;             /* n_rows x rows */
  int64_t threads;
};

template <int TC>
static void run(const Args& A) {
  const int64_t T = A.tr * A.tc;
  #pragma omp parallel for schedule(static) num_threads(A.threads)
  for (int64_t i = 0; i < A.n_tr; i++) {
    float acc_stack[16 * 64 * 8];
    float wbuf_stack[64 * 64];
    const int64_t r0 = i * A.tr;
    const int64_t trh = (A.rows - r0 < A.tr) ? A.rows - r0 : A.tr;
    float* acc = acc_stack;
    for (int64_t k = 0; k < A.n_rows * A.tr * 8; k++) acc[k] = 0.f;
    for (int64_t j = 0; j < A.n_tc; j++) {
      const int64_t c0 = j * A.tc;
      const int64_t tcw = (A.cols - c0 < A.tc) ? A.cols - c0 : A.tc;
      const int64_t local = i * A.n_tc + j;
      const float s = A.tile_scale[local];
      const float* w;
      float post = s;
      if (!A.build) {
        w = A.z + A.tile_slot[local] * T;
      } else {
        float* wb = wbuf_stack;
        for (int64_t a = 0; a < trh; a++) {
          for (int64_t b = 0; b < tcw; b++) {
            const int64_t e = a * A.tc + b;
            const int64_t v = virtual_index(local, e, A.tile_offset, T);
            float zv;
            if (A.tile_slot) zv = A.z[A.tile_slot[local] * T + e];
            else zv = A.z[hashednet_slot(v, A.segment_start, A.segment_size, A.slot_a, A.slot_b)];
            float sc = s;
            if (A.element_sign) sc *= (float)hash_sign(v, A.sign_a, A.sign_b);
            wb[e] = round_to(zv * sc, (int)A.rounding);
          }
        }
        w = wb;
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

extern "C" int hf_roast_gemv(const Args* A) {
  if (A->tr > 64 || A->tc > 64 || A->n_rows > 16) return 1;
  if (A->tc == 32) run<32>(*A); else if (A->tc == 16) run<16>(*A); else if (A->tc == 64) run<64>(*A); else run<0>(*A);
  return 0;
}
"""
_MAX_TILE = 64  # the kernel's stack buffers: tiles of at most 64 x 64, at most 16 rows (see MAX_ROWS)


class _Args(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("n_rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("z", ctypes.c_void_p),
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
        return lib


_library = _Library()


def unavailable_reason() -> str | None:
    """None when the kernel is built (or builds now); otherwise why it cannot be (no compiler, build error)."""
    if _library.lib is not None:  # built: no lock on the per-call path
        return None
    return None if _library.load() is not None else _library.error


def unsupported_reason(x: torch.Tensor, z: torch.Tensor, layer_map: LayerMapping) -> str | None:
    """None when this path can run the call; otherwise why not (device, dtypes, rows, tile size)."""
    if not (x.is_cpu and z.is_cpu):
        return f"the tensors are on {x.device.type}, and the CPU path runs on CPU tensors"
    if x.dtype not in CPU_DTYPES:
        return f"the CPU path takes float32, bfloat16 or float16 activations, not {x.dtype}"
    if z.dtype != torch.float32:
        return f"the CPU path reads a float32 z, not {z.dtype}"
    rows = x.numel() // max(1, x.shape[-1])
    if rows > MAX_ROWS:
        return f"the CPU path takes at most {MAX_ROWS} rows per call, not {rows}"
    tr, tc = layer_map.plan.tile
    if tr > _MAX_TILE or tc > _MAX_TILE:
        return f"the CPU path takes mapping tiles of at most {_MAX_TILE}x{_MAX_TILE}, not {tr}x{tc}"
    return None


def _prepared_args(
    layer_map: LayerMapping, z: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> tuple[_Args, torch.Tensor | None]:
    """The call's constant arguments (pointers to z, the tables and the bias; geometry; hash constants),
    built once per layer and cached on its :class:`LayerMapping`: decode calls every layer once per token,
    and rebuilding them cost more than the GEMV of a small layer. The cache holds the tensors it points
    into (so no pointer outlives its memory) and is keyed by their identity, and by the bias's version
    when the bias is rounded into a copy (bf16/fp16 activations), so an in-place update is never missed.
    """
    rounding = _ROUNDING[dtype]
    needs_copy = bias is not None and dtype != torch.float32
    # data_ptr: `param.data = ...` (as Module.to does) keeps the Parameter object but moves its memory
    key = (
        z,
        bias,
        dtype,
        z.data_ptr(),
        bias.data_ptr() if bias is not None else 0,
        bias._version if needs_copy else 0,
    )
    cached = layer_map.__dict__.get("_cpu_args")
    if cached is not None and all(a is b for a, b in zip(cached[0][:2], key)) and cached[0][2:] == key[2:]:
        return cached[1], cached[2]
    spec, plan = layer_map.spec, layer_map.plan
    scale = layer_map.tile_scale.contiguous()
    slots = layer_map.tile_slot.contiguous() if plan.is_tiled else None
    zc = z.detach()
    if not zc.is_contiguous():
        raise ValueError(f"{spec.name}: z must be contiguous for the CPU path.")
    b = None
    if bias is not None:
        b = bias.detach().to(dtype).to(torch.float32).contiguous()
    slot_a, slot_b = seed_constants(plan.seed, "slot")
    sign_a, sign_b = seed_constants(plan.seed, "sign")
    element_sign = plan.sign == "element"
    tr, tc = plan.tile
    args = _Args(
        n_rows=0,
        cols=spec.cols,
        z=zc.data_ptr(),
        tile_slot=slots.data_ptr() if slots is not None else None,
        tile_scale=scale.data_ptr(),
        rows=spec.rows,
        tr=tr,
        tc=tc,
        n_tr=spec.n_tile_rows(plan.tile),
        n_tc=spec.n_tile_cols(plan.tile),
        build=int(rounding != 0 or element_sign or not plan.is_tiled),
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
    # the tensors the pointers reach stay referenced by the cache entry
    layer_map.__dict__["_cpu_args"] = (key, args, b, (zc, scale, slots))
    return args, b


def cpu_roast_linear(
    x: torch.Tensor, z: torch.Tensor, bias: torch.Tensor | None, layer_map: LayerMapping
) -> torch.Tensor:
    """``x W^T + b`` in ``x.dtype`` with W read tile by tile from z; no gradient. Check
    :func:`unsupported_reason` and :func:`unavailable_reason` first."""
    lib = _library.lib or _library.load()
    if lib is None:
        raise RuntimeError(f"The hf-roast CPU kernel is not available: {_library.error}")
    spec = layer_map.spec
    x2 = x
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    n = x2.numel() // spec.cols
    out_shape = x.shape[:-1] + (spec.rows,)
    y = torch.empty(out_shape, dtype=torch.float32)
    if n == 0:
        return y.to(x.dtype)
    prepared, _ = _prepared_args(layer_map, z, bias, x.dtype)
    args = _Args.from_buffer_copy(prepared)  # per call: concurrent callers never share one struct
    args.x = x2.data_ptr()
    args.n_rows = n
    args.y = y.data_ptr()
    args.threads = max(1, min(torch.get_num_threads(), n * spec.rows * spec.cols // PARALLEL_GRAIN))
    if lib.hf_roast_gemv(ctypes.byref(args)) != 0:
        raise ValueError(f"hf_roast CPU kernel refused {n} rows with a {args.tr}x{args.tc} tile.")
    return y if x.dtype == torch.float32 else y.to(x.dtype)
