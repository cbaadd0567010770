"""The CPU backend's contract: its one gate (:func:`unsupported_reason`) and its ops.

* :func:`cpu_roast_linear`: ``x W^T + b`` as a fused gather-GEMV that reads z tile by tile and never writes W,
  for inference calls of a few rows (decode, short prompts);
* :func:`build_weight`: W itself in fp32, in one pass over its tiles, for the PyTorch backend on CPU
  (prefill, training), which dispatch hands it to where the resolved backend allows native code;
* :func:`linear_kernel` / :func:`linear_packed_kernel`: the same kernel as the CPU implementation of the ops
  ``hf_roast::roast_linear`` / ``roast_linear_packed`` (:mod:`hf_roast.backends.custom_ops`, registered for
  CPU by :mod:`hf_roast.backends.cpu_kernels`). An op call may have any number of rows: above
  :data:`MAX_ROWS` the kernel builds W in one pass and runs one GEMM, as the PyTorch path does on CPU (same
  values);
* :func:`dequantize`: the kernel's reader of a packed z, exposed for tests.

Each is a call of a torch op whose CPU kernel is C++ (``hf_roast::roast_linear_cpu``, ``roast_weight_cpu``,
``roast_dequantize_cpu``, registered when :mod:`.build` loads the library), so an eager call and a compiled
graph run the same kernel, and neither enters Python between the op and the loop.

For a few rows building W costs far more than the product: the PyTorch path writes and reads back
``rows x cols`` weights per call, where the product itself needs only one pass over them. Here one small C++
loop (``roast_cpu.cpp``), parallelised with OpenMP over tile rows, reads each mapping tile straight from its
aligned span of z (the tile tables of :class:`hf_roast.mapping.LayerMapping`: slot and ``lambda * tile
sign``) and reduces it against every input row while it sits in L1. The only per-call allocation is the
output. Element signs and the HashedNet mapper use the formulas of ``hf_roast/mapping.py`` translated to C
(:mod:`.translate`), and the tests check that both paths read bit-identical weights. Weights are rounded into
the activation dtype exactly as the PyTorch path rounds them (``(z * lambda * sign).to(dtype)``), and
accumulated in fp32.

z may be fp32, bf16 or fp16 (a 16-bit z multiplies in its own dtype first, as the PyTorch path does), or
packed (``RoastConfig.z_bits`` 8 or 4, :class:`hf_roast.quant.QuantizedZ`): each slot tile's int8 or 4-bit
codes are dequantised into an fp32 tile buffer as the tile is read, ``code * scale`` of its group, with the
element formulas of ``hf_roast/quant.py`` translated as well; nothing z-sized or W-sized is built.
Quantisation-aware training (an fp32 master read through its grid) is not read here, and nothing here has a
backward: the gate refuses both, and :mod:`hf_roast.backends.dispatch` asks it before every call.
"""

from __future__ import annotations

import torch

from hf_roast.backends.geometry import geometry_of
from hf_roast.mapping import LayerMapping
from hf_roast.quant import QuantizedZ

from . import build
from .build import MAX_ROWS, MAX_TILE

CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Activation dtypes the kernel takes (it computes in fp32 and rounds W into them), and the float dtypes of z
it reads (besides a packed z: int8 or 4-bit codes and their group scales)."""


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
    applies), no ``torch.compile`` tracing (this gate loads the library, which no graph may do; compiled calls
    are gated by :func:`op_unsupported_reason`, and the PyTorch path does not hand its scratch W over while
    compiling), tiles of at most :data:`MAX_TILE` x :data:`MAX_TILE`, and the library
    built: that last reason is an :class:`Unavailable`.

    Decode runs the checks once per layer and token, so they are ordered to fail fast in training (the
    gradient check first) and each costs well under a microsecond."""
    if x is not None:
        if _needs_grad(z, x, bias):
            return "the call needs gradients (training), and the CPU path is forward-only"
    elif weight_dtype != torch.float32:
        return f"the CPU path builds fp32 weights, not {weight_dtype}"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing, and compiled calls are gated by op_unsupported_reason"
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


def _z_operands(z: torch.Tensor | QuantizedZ) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """z as the ops take it: the float z, or the codes with their scales; and ``zformat`` ([0, 0] for float)."""
    if isinstance(z, QuantizedZ):
        return z.codes, z.scales, [z.bits, z.group_size]
    return z, None, [0, 0]


_LINEAR = torch.ops.hf_roast.roast_linear_cpu.default
_WEIGHT = torch.ops.hf_roast.roast_weight_cpu.default
_DEQUANTIZE = torch.ops.hf_roast.roast_dequantize_cpu.default
"""The ops' overloads, looked up once (defined by :mod:`hf_roast.backends.custom_ops`, which .build imports)."""


def cpu_roast_linear(
    x: torch.Tensor, z: torch.Tensor | QuantizedZ, bias: torch.Tensor | None, layer_map: LayerMapping
) -> torch.Tensor:
    """``x W^T + b`` in ``x.dtype`` with W read tile by tile from z (float, or packed codes dequantised as
    they are read); no gradient. Check :func:`unsupported_reason` (or, while compiling,
    :func:`op_unsupported_reason`) first: the gate loads the library, which registers the op's kernel. A call of
    the op itself (no Python between it and the loop), so a compiled graph calls it as one node."""
    data, scales, zformat = _z_operands(z)
    return _LINEAR(
        x, data, scales, bias, layer_map.tile_slot, layer_map.tile_scale, geometry_of(layer_map), zformat
    )


def build_weight(z: torch.Tensor | QuantizedZ, layer_map: LayerMapping, out: torch.Tensor) -> torch.Tensor:
    """W (``rows x cols``, fp32) into ``out`` in one pass over its tiles: each read from its span of z
    (dequantised if packed), scaled and signed exactly as :func:`hf_roast.backends.pytorch.materialize_weight`
    builds it, and written in place. Used by the PyTorch path on CPU (prefill, training) where
    :func:`unsupported_reason` (without ``x``) allows; the PyTorch path's gather and permuted copy write W
    twice."""
    spec = layer_map.spec
    if out.shape != (spec.rows, spec.cols) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"build_weight needs a contiguous fp32 {spec.rows}x{spec.cols} output.")
    build.loaded_library()
    data, scales, zformat = _z_operands(z)
    with torch.no_grad():
        _WEIGHT(data, scales, layer_map.tile_slot, layer_map.tile_scale, geometry_of(layer_map), zformat, out)
    return out


def dequantize(z: QuantizedZ, start: int = 0, n: int | None = None) -> torch.Tensor:
    """``z[start : start + n]`` dequantised by the kernel's own reader (fp32): what the CPU path computes
    with, exposed so that tests compare it with :meth:`hf_roast.quant.QuantizedZ.values_at` bit for bit."""
    n = z.numel - start if n is None else n
    if start < 0 or n < 0 or start + n > z.numel:
        raise ValueError(f"span [{start}, {start + n}) lies outside z's {z.numel} values")
    build.loaded_library()
    return _DEQUANTIZE(z.codes, z.scales, z.bits, z.group_size, start, n)


def kernel_calls() -> dict[str, int]:
    """How often the C++ kernel has run its GEMV and its W build in this process: tests check with it that
    torch ran this kernel (and not another implementation of the same op)."""
    lib = build.loaded_library()
    return {"gemv": lib.hf_roast_kernel_calls(0), "weight": lib.hf_roast_kernel_calls(1)}


# --------------------------------------------------------------------------------------------------
# The CPU implementation of the ops hf_roast::roast_linear and roast_linear_packed.
# --------------------------------------------------------------------------------------------------
def linear_kernel(x, z, bias, tile_slot, tile_scale, scaler_inv, geometry) -> torch.Tensor:
    """The CPU kernel of ``hf_roast::roast_linear`` (forward only: the op has no CPU backward)."""
    build.loaded_library()
    return _LINEAR(x, z, None, bias, tile_slot, tile_scale, geometry, [0, 0])


def linear_packed_kernel(x, codes, scales, bias, tile_slot, tile_scale, geometry, zformat) -> torch.Tensor:
    """The CPU kernel of ``hf_roast::roast_linear_packed``: z as int8 / 4-bit codes and group scales."""
    build.loaded_library()
    return _LINEAR(x, codes, scales, bias, tile_slot, tile_scale, geometry, zformat)


KERNELS = {"roast_linear": linear_kernel, "roast_linear_packed": linear_packed_kernel}
"""The ops this backend implements for CPU tensors, by name (registered by hf_roast.backends.cpu_kernels)."""
