"""The CPU backend's contract: its one gate (:func:`unsupported_reason`) and its ops.

* :func:`cpu_roast_linear`: ``x W^T + b`` as a fused gather-GEMV that reads z tile by tile and never writes W,
  for inference calls of a few rows (decode, short prompts);
* :func:`build_weight`: W itself in fp32, in one pass over its tiles, for the PyTorch backend on CPU
  (prefill, training), which dispatch hands it to where the resolved backend allows native code;
* :func:`linear_kernel` / :func:`linear_packed_kernel`: the same GEMV as the CPU implementation of the ops
  ``hf_roast::roast_linear`` / ``roast_linear_packed`` (:mod:`hf_roast.backends.custom_ops`, registered for
  CPU by :mod:`hf_roast.backends.cpu_kernels`), so that ``torch.compile`` traces a call as one node and
  torch runs this kernel for CPU tensors. An op call may have any number of rows: above :data:`MAX_ROWS`
  the kernel builds W in one pass and runs one GEMM, as the PyTorch path does on CPU (same values);
* :func:`dequantize`: the kernel's reader of a packed z, exposed for tests.

For a few rows building W costs far more than the product: the PyTorch path writes and reads back
``rows x cols`` weights per call, where the product itself needs only one pass over them. Here one small C++
loop (``roast_cpu.cpp``, built by :mod:`.build`), parallelised with OpenMP over tile rows, reads each mapping
tile straight from its aligned span of z (the tile tables of :class:`hf_roast.mapping.LayerMapping`: slot and
``lambda * tile sign``) and reduces it against every input row while it sits in L1. The only per-call
allocation is the output. Element signs and the HashedNet mapper use the formulas of ``hf_roast/mapping.py``
translated to C (:mod:`.translate`), and the tests check that both paths read bit-identical weights. Weights
are rounded into the activation dtype exactly as the PyTorch path rounds them (``(z * lambda * sign).to(dtype)``),
and accumulated in fp32.

z may be fp32, bf16 or fp16 (a 16-bit z multiplies in its own dtype first, as the PyTorch path does), or
packed (``RoastConfig.z_bits`` 8 or 4, :class:`hf_roast.quant.QuantizedZ`): each slot tile's int8 or 4-bit
codes are dequantised into an fp32 tile buffer as the tile is read, ``code * scale`` of its group, with the
element formulas of ``hf_roast/quant.py`` translated as well; nothing z-sized or W-sized is built.
Quantisation-aware training (an fp32 master read through its grid) is not read here, and nothing here has a
backward: the gate refuses both, and :mod:`hf_roast.backends.dispatch` asks it before every call.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from hf_roast.backends.geometry import Geometry, geometry_of
from hf_roast.mapping import LayerMapping
from hf_roast.quant import QuantizedZ

from . import build
from .build import ArgsStruct, ZStruct

CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Activation dtypes the kernel takes (it computes in fp32 and rounds W into them), and the float dtypes of z
it reads (besides a packed z: int8 or 4-bit codes and their group scales)."""
MAX_ROWS = 16
"""Most rows (batch x sequence) a call may have on this path: above it the PyTorch path's W build is
amortised over enough rows that its GEMM wins (measured: see README "Speed")."""
MAX_TILE = 64
"""The kernel's stack buffers hold tiles of at most 64 x 64 (and at most MAX_ROWS rows)."""
PARALLEL_GRAIN = 1 << 18
"""Multiply-adds per thread below which a call runs on one thread. SmolLM2's k/v projections (110K
multiply-adds) run on one thread, where a fork/join would cost more than it saves; its other layers
(330K-885K) use torch's thread count. The loop runs in torch's own OpenMP pool (the library links the
libgomp torch loaded), whose threads are still spinning from torch's previous op. Measured with
``hf-roast bench --generate --threads 2`` on an idle 2-core machine: 16x decode 1.07x dense with one
thread per call, 1.07-1.2x with this grain; on a machine busy with other jobs a fork/join can wait a whole
scheduler slice, so there fewer threads (``torch.set_num_threads``) are faster."""
_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class Unavailable(str):
    """A reason of the machine (no compiler, a build error), not of the call: under ``auto`` dispatch warns
    once about it, since every later call would take the slower path for the same reason."""


def unavailable_reason() -> Unavailable | None:
    """None when the kernel is built (or builds now); otherwise why it cannot be, as :class:`Unavailable`."""
    reason = build.unavailable_reason()
    return None if reason is None else Unavailable(reason)


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


def _common_reason(
    z: torch.Tensor | QuantizedZ, layer_map: LayerMapping, x: torch.Tensor | None
) -> str | None:
    """The checks every use of the kernel shares: no QAT, the activations and z it reads, tile size."""
    if layer_map.fake_quant is not None:
        return "quantisation-aware training reads z through its grid on the PyTorch path"
    if x is not None:
        if torch.is_autocast_enabled("cpu"):
            return "CPU autocast is on; the PyTorch path applies its casts"
        if not x.is_cpu:
            return f"the tensors are on {x.device.type}, and the CPU path runs on CPU tensors"
        if x.dtype not in CPU_DTYPES:
            return f"the CPU path takes float32, bfloat16 or float16 activations, not {x.dtype}"
    reason = _z_reason(z)
    if reason is not None:
        return reason
    return _tile_reason(layer_map.plan.tile)


def _tile_reason(tile: tuple[int, int]) -> str | None:
    tr, tc = tile
    if tr > MAX_TILE or tc > MAX_TILE:
        return f"the CPU path takes mapping tiles of at most {MAX_TILE}x{MAX_TILE}, not {tr}x{tc}"
    return None


def _needs_grad(z: torch.Tensor | QuantizedZ, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad
        or (not isinstance(z, QuantizedZ) and z.requires_grad)  # a packed z is no parameter
        or (bias is not None and bias.requires_grad)
    )


def unsupported_reason(
    z: torch.Tensor | QuantizedZ,
    layer_map: LayerMapping,
    x: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    weight_dtype: torch.dtype = torch.float32,
) -> str | None:
    """The CPU backend's one gate for a direct (eager) call: None when its kernel can run it, otherwise why not.

    With ``x``, the call is the fused GEMV ``x W^T + b`` (:func:`cpu_roast_linear`): forward only, at most
    :data:`MAX_ROWS` rows, activations of :data:`CPU_DTYPES`, outside CPU autocast. Without ``x``, it is
    building W in ``weight_dtype`` (:func:`build_weight`, fp32 only). Both need a z this kernel reads (on
    CPU; float, or packed codes and fp32 scales), no quantisation-aware training (whose grid the PyTorch path
    applies), no ``torch.compile`` tracing (a direct call is opaque to it: compiled calls take the op, see
    :func:`op_unsupported_reason`), tiles of at most :data:`MAX_TILE` x :data:`MAX_TILE`, and the library
    built: that last reason is an :class:`Unavailable`.

    Decode runs the checks once per layer and token, so they are ordered to fail fast in training (the
    gradient check first) and each costs well under a microsecond."""
    if x is not None:
        if _needs_grad(z, x, bias):
            return "the call needs gradients (training), and the CPU path is forward-only"
    elif weight_dtype != torch.float32:
        return f"the CPU path builds fp32 weights, not {weight_dtype}"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing, and a direct call of the CPU kernel is opaque to it"
    reason = _common_reason(z, layer_map, x)
    if reason is not None:
        return reason
    if x is not None:
        rows = x.numel() // max(1, x.shape[-1])
        if rows > MAX_ROWS:
            return f"the CPU path takes at most {MAX_ROWS} rows per call, not {rows}"
    return unavailable_reason()


@torch.compiler.assume_constant_result
def _library_reason() -> str:
    """:func:`unavailable_reason` as a constant for ``torch.compile`` (building the library is no graph
    op); "" when the library is built."""
    return unavailable_reason() or ""


def op_unsupported_reason(
    z: torch.Tensor | QuantizedZ, layer_map: LayerMapping, x: torch.Tensor, bias: torch.Tensor | None
) -> str | None:
    """The gate for a call through the op (``torch.compile`` traces it; the kernel runs later): as
    :func:`unsupported_reason` but for any number of rows (the op's CPU kernel builds W for more than
    :data:`MAX_ROWS`), and traceable. The op has no CPU backward, so a call that needs gradients is refused."""
    if _needs_grad(z, x, bias):
        return "the call needs gradients (training), and the CPU path is forward-only"
    reason = _common_reason(z, layer_map, x)
    if reason is not None:
        return reason
    reason = _library_reason()
    return Unavailable(reason) if reason else None


def _z_struct(z: torch.Tensor | QuantizedZ) -> tuple[ZStruct, tuple[torch.Tensor, ...]]:
    """The kernel's view of z, and the contiguous tensors it points into (kept alive by the caller)."""
    if isinstance(z, QuantizedZ):
        codes, scales = z.codes.contiguous(), z.scales.contiguous()
        return ZStruct(None, 0, codes.data_ptr(), scales.data_ptr(), z.bits, z.group_size), (codes, scales)
    data = z.detach().contiguous()
    return ZStruct(data.data_ptr(), _ROUNDING[data.dtype], None, None, 0, 0), (data,)


def dequantize(z: QuantizedZ, start: int = 0, n: int | None = None) -> torch.Tensor:
    """``z[start : start + n]`` dequantised by the kernel's own reader (fp32): what the CPU path computes
    with, exposed so that tests compare it with :meth:`hf_roast.quant.QuantizedZ.values_at` bit for bit."""
    lib = build.loaded_library()
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
    owner: dict,
    geometry: Callable[[], Geometry],
    z: torch.Tensor | QuantizedZ,
    tile_slot: torch.Tensor | None,
    tile_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> ArgsStruct:
    """The call's constant arguments (pointers to z, the tables and the bias; geometry; hash constants),
    built once per layer and cached in ``owner`` (its :class:`LayerMapping`'s ``__dict__`` for a direct
    call, an entry keyed by the layer's ``tile_scale`` table for an op call): decode calls every layer once
    per token, and rebuilding them cost more than the GEMV of a small layer. The cache holds the tensors it
    points into (so no pointer outlives its memory) and is keyed by their identity and address
    (``param.data = ...``, as ``Module.to`` does, keeps the Parameter but moves its memory), and by the
    bias's version when the bias is rounded into a copy (bf16/fp16 activations), so an in-place update is
    never missed. ``geometry`` is called on a miss only.
    """
    stored = (z.codes, z.scales) if isinstance(z, QuantizedZ) else (z, z)  # a packed z is rebuilt per read
    needs_copy = bias is not None and dtype != torch.float32
    key = (
        *stored,
        bias,
        tile_slot,
        tile_scale,
        dtype,
        stored[0].data_ptr(),
        stored[1].data_ptr(),
        bias.data_ptr() if bias is not None else 0,
        bias._version if needs_copy else 0,
    )
    cached = owner.get("_cpu_args")
    if cached is not None and all(a is b for a, b in zip(cached[0][:5], key)) and cached[0][5:] == key[5:]:
        return cached[1]
    geo = geometry()
    z_view, keep_alive = _z_struct(z)
    scale = tile_scale.contiguous()
    slots = tile_slot.contiguous() if geo.tiled else None
    b = None
    if bias is not None:
        b = bias.detach().to(dtype).to(torch.float32).contiguous()
    rounding = _ROUNDING[dtype]
    args = ArgsStruct(
        n_rows=0,
        cols=geo.cols,
        z=z_view,
        tile_slot=slots.data_ptr() if slots is not None else None,
        tile_scale=scale.data_ptr(),
        rows=geo.rows,
        tr=geo.tile_rows,
        tc=geo.tile_cols,
        n_tr=geo.n_tile_rows,
        n_tc=geo.n_tile_cols,
        # fp32 weights straight from (dequantised) fp32 tiles unless a sign, a hash or a rounding intervenes
        build=int(rounding != 0 or geo.element_sign or not geo.tiled or z_view.zkind != 0),
        rounding=rounding,
        element_sign=int(geo.element_sign),
        tile_offset=geo.tile_offset,
        segment_start=geo.seg_start,
        segment_size=geo.seg_size,
        slot_a=geo.slot_a,
        slot_b=geo.slot_b,
        sign_a=geo.sign_a,
        sign_b=geo.sign_b,
        bias=b.data_ptr() if b is not None else None,
    )
    # the entry holds every tensor the pointers reach, so none is freed while the entry lives
    owner["_cpu_args"] = (key, args, (b, scale, slots, *keep_alive))
    return args


def _layer_args(
    layer_map: LayerMapping, z: torch.Tensor | QuantizedZ, bias: torch.Tensor | None, dtype: torch.dtype
) -> ArgsStruct:
    """:func:`_prepared_args` of a direct call, cached on the layer's mapping."""
    return _prepared_args(
        layer_map.__dict__,
        lambda: Geometry.from_list(geometry_of(layer_map)),
        z,
        layer_map.tile_slot,
        layer_map.tile_scale,
        bias,
        dtype,
    )


def _gemv(lib, x: torch.Tensor, args: ArgsStruct) -> torch.Tensor:
    """The fused GEMV of at most :data:`MAX_ROWS` rows of ``x`` (any leading shape), in ``x.dtype``."""
    x2 = x
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    n = x2.numel() // args.cols
    y = torch.empty(x.shape[:-1] + (args.rows,), dtype=torch.float32)
    if n == 0:
        return y.to(x.dtype)
    # a copy per call: concurrent callers never share one struct
    args = ArgsStruct.from_buffer_copy(args)
    args.x = x2.data_ptr()
    args.n_rows = n
    args.y = y.data_ptr()
    args.threads = max(1, min(torch.get_num_threads(), n * args.rows * args.cols // PARALLEL_GRAIN))
    if lib.hf_roast_gemv(ctypes.byref(args)) != 0:
        raise ValueError(f"hf_roast CPU kernel refused {n} rows with a {args.tr}x{args.tc} tile.")
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _build(lib, args: ArgsStruct, out: torch.Tensor) -> torch.Tensor:
    """W (fp32, ``rows x cols``) into the contiguous ``out``, from arguments prepared for fp32 weights."""
    args = ArgsStruct.from_buffer_copy(args)
    args.threads = max(1, min(torch.get_num_threads(), args.rows * args.cols // PARALLEL_GRAIN))
    if lib.hf_roast_build_weight(ctypes.byref(args), out.data_ptr()) != 0:
        raise ValueError(f"hf_roast CPU kernel refused to build a weight with a {args.tr}x{args.tc} tile.")
    return out


def cpu_roast_linear(
    x: torch.Tensor, z: torch.Tensor | QuantizedZ, bias: torch.Tensor | None, layer_map: LayerMapping
) -> torch.Tensor:
    """``x W^T + b`` in ``x.dtype`` with W read tile by tile from z (float, or packed codes dequantised as
    they are read); no gradient. Check :func:`unsupported_reason` first."""
    lib = build.loaded_library()
    return _gemv(lib, x, _layer_args(layer_map, z, bias, x.dtype))


def build_weight(z: torch.Tensor | QuantizedZ, layer_map: LayerMapping, out: torch.Tensor) -> torch.Tensor:
    """W (``rows x cols``, fp32) into ``out`` in one pass over its tiles: each read from its span of z
    (dequantised if packed), scaled and signed exactly as :func:`hf_roast.backends.pytorch.materialize_weight`
    builds it, and written in place. Used by the PyTorch path on CPU (prefill, training) where
    :func:`unsupported_reason` (without ``x``) allows; the PyTorch path's gather and permuted copy write W
    twice."""
    spec = layer_map.spec
    if out.shape != (spec.rows, spec.cols) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"build_weight needs a contiguous fp32 {spec.rows}x{spec.cols} output.")
    lib = build.loaded_library()
    return _build(lib, _layer_args(layer_map, z, None, torch.float32), out)


# --------------------------------------------------------------------------------------------------
# The CPU implementation of the ops hf_roast::roast_linear and roast_linear_packed.
# --------------------------------------------------------------------------------------------------
_OP_ARGS: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Prepared arguments of op calls, by the layer's ``tile_scale`` table (the op gets no LayerMapping); an
entry goes with its table."""

kernel_calls = {"gemv": 0, "weight": 0}
"""How often the op's CPU kernel ran the GEMV and the W build: tests check that torch ran this kernel."""


def _op_linear(
    x: torch.Tensor,
    z: torch.Tensor | QuantizedZ,
    bias: torch.Tensor | None,
    tile_slot: torch.Tensor | None,
    tile_scale: torch.Tensor,
    geometry: list[int],
) -> torch.Tensor:
    """``x W^T + b`` for an op call: the GEMV for at most :data:`MAX_ROWS` rows, else W built in one pass and
    one GEMM (``F.linear``, as the PyTorch path runs it on CPU with this W: the same values). Raises, never
    guesses, for a call the kernel cannot read (dispatch routes those to the PyTorch path)."""
    reason = _z_reason(z) or _tile_reason((int(geometry[2]), int(geometry[3])))
    if reason is None and (not x.is_cpu or x.dtype not in CPU_DTYPES):
        reason = (
            f"the CPU kernel takes float32, bfloat16 or float16 CPU activations, not {x.dtype} on {x.device}"
        )
    if reason is not None:
        raise RuntimeError(
            f"hf_roast::roast_linear on CPU: {reason}. Call it through hf_roast's layers instead."
        )
    lib = build.loaded_library()
    owner = _OP_ARGS.get(tile_scale)
    if owner is None:
        owner = _OP_ARGS[tile_scale] = {}
    rows, cols = int(geometry[0]), int(geometry[1])
    if x.shape[-1] != cols:
        raise ValueError(
            f"hf_roast::roast_linear: the input has {x.shape[-1]} features, the layer takes {cols}."
        )

    def geo() -> Geometry:
        return Geometry.from_list(geometry)

    if x.numel() // max(1, cols) <= MAX_ROWS:
        kernel_calls["gemv"] += 1
        return _gemv(lib, x, _prepared_args(owner, geo, z, tile_slot, tile_scale, bias, x.dtype))
    kernel_calls["weight"] += 1
    args = _prepared_args(owner, geo, z, tile_slot, tile_scale, None, torch.float32)
    w = _build(lib, args, torch.empty(rows, cols, dtype=torch.float32)).to(x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)


def linear_kernel(x, z, bias, tile_slot, tile_scale, scaler_inv, geometry) -> torch.Tensor:
    """The CPU kernel of ``hf_roast::roast_linear`` (forward only: the op has no CPU backward)."""
    return _op_linear(x, z, bias, tile_slot, tile_scale, geometry)


def linear_packed_kernel(x, codes, scales, bias, tile_slot, tile_scale, geometry, zformat) -> torch.Tensor:
    """The CPU kernel of ``hf_roast::roast_linear_packed``: z as int8 / 4-bit codes and group scales."""
    z = QuantizedZ(codes, scales, int(zformat[0]), int(zformat[1]))
    return _op_linear(x, z, bias, tile_slot, tile_scale, geometry)


KERNELS = {"roast_linear": linear_kernel, "roast_linear_packed": linear_packed_kernel}
"""The ops this backend implements for CPU tensors, by name (registered by hf_roast.backends.cpu_kernels)."""
