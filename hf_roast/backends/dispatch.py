"""The front of the backends: choose the execution path of a ROAST op, once per call.

Fused Triton kernels on CUDA (:mod:`hf_roast.backends.triton`), the CPU gather-GEMV for inference on CPU
(:mod:`hf_roast.backends.cpu`), the PyTorch path (:mod:`hf_roast.backends.pytorch`) elsewhere.

``HF_ROAST_BACKEND`` (``auto`` / ``torch`` / ``triton`` / ``cpu``) overrides the config's ``backend`` field.
It is read once per call, by :func:`requested_backend`, and the resolved backend is passed down from there;
nothing below this module reads the environment. ``auto`` takes the kernels for CUDA tensors of a supported
dtype when triton is installed; on CPU, a linear call that the CPU backend's gate
(:func:`hf_roast.backends.cpu.ops.unsupported_reason`: no gradient, at most ``MAX_ROWS`` rows, z fp32, bf16,
fp16 or packed int8 / 4-bit...) accepts takes the CPU path, and every other call the PyTorch path, whose fp32
W the CPU backend builds in one pass where that same gate allows (:func:`native_weight`).
Quantisation-aware training (``z_qat``: an fp32 master read through its grid) always takes the PyTorch path,
in training and in eval alike. A forced ``triton`` or ``cpu`` that cannot run raises an error saying why,
rather than silently falling back. ``torch`` switches both off, native code included: no C++ runs under it.
Embeddings take the PyTorch path on CPU under every backend: it already gathers only the looked-up rows.
While ``torch.compile`` traces, a CPU call that needs no gradient goes through the same kernel, the op
``hf_roast::roast_linear_cpu`` (one graph node; its CPU kernel is C++, for any number of rows), so a compiled
model runs the same kernel as eager decode, and its graph calls the C++ kernel with no Python in between.
Where ``auto`` would take the CPU path but no C++ compiler can build it, one warning says so and the
PyTorch path runs.
"""

from __future__ import annotations

import os
import warnings

import torch

from hf_roast.mapping import LayerMapping
from hf_roast.quant import QuantizedZ
from hf_roast.vocab import BACKENDS, ENV_BACKEND

from . import cpu_kernels  # noqa: F401  (registers the ops' CPU kernels on import)
from .cpu import ops as cpu
from .geometry import spec_geometry
from .pytorch import NativeWeight, RoastEmbeddingFunction, RoastLinearFunction, read_dtype
from .pytorch import materialize_weight as _pytorch_weight


def requested_backend(requested: str) -> str:
    """The environment variable if set, else the config's value; validated. Called once per op."""
    backend = os.environ.get(ENV_BACKEND) or requested or "auto"
    if backend not in BACKENDS:
        source = f"{ENV_BACKEND}={backend!r}" if os.environ.get(ENV_BACKEND) else f"backend={backend!r}"
        raise ValueError(f"{source}: use {', '.join(map(repr, BACKENDS[:-1]))} or {BACKENDS[-1]!r}.")
    return backend


def resolve_backend(requested: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> str:
    """'torch', 'triton' or 'cpu' for tensors on ``device`` of ``dtypes``; a clear error when a forced path
    cannot run. 'cpu' only when forced: ``auto`` chooses it per call in :func:`roast_linear`, by rows."""
    return _resolve(requested_backend(requested), device, dtypes)


def _resolve(backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str:
    """:func:`resolve_backend` of an already requested (validated) backend."""
    if backend == "torch" or device.type == "meta":
        return "torch"  # meta tensors: shape inference, which the PyTorch path does for free
    if backend == "cpu":
        if device.type != "cpu":
            raise RuntimeError(
                f"The CPU backend was forced ({ENV_BACKEND} or config.backend='cpu') but the tensors are on "
                f"{device.type}. Use backend='auto' instead."
            )
        return "cpu"
    if backend == "auto" and device.type != "cuda":
        return "torch"  # auto takes the kernels on CUDA only; this early exit is the per-call fast path
    from .triton.available import triton_unavailable_reason

    reason = triton_unavailable_reason(device, dtypes)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(
                f"The Triton backend was forced ({ENV_BACKEND} or config.backend='triton') but cannot run: "
                f"{reason}. Use backend='torch' (or 'auto') instead."
            )
        return "triton"
    # auto: the kernels only where they pay off (CUDA); the interpreter is for tests that force them.
    return "triton" if reason is None and device.type == "cuda" else "torch"


def _path(
    backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...], layer_map: LayerMapping
) -> str:
    """As :func:`_resolve`; quantisation-aware training (an fp32 master read through its grid) runs on
    the PyTorch path only: ``auto`` takes it, a forced ``triton`` raises."""
    path = _resolve(backend, device, dtypes)
    if path == "triton" and layer_map.fake_quant is not None:
        if backend == "triton":
            raise RuntimeError(
                f"{layer_map.spec.name}: quantisation-aware training (z_qat=True) runs on the PyTorch path only; the "
                "Triton kernels read packed z (model.quantize_z) or float z. Use backend='torch' (or 'auto')."
            )
        return "torch"
    return path


_CPU_WEIGHT = NativeWeight(
    # through the module's attributes at call time, so that tests can watch or replace the entry points
    reason=lambda z, layer_map, dtype: cpu.unsupported_reason(z, layer_map, weight_dtype=dtype),
    build=lambda z, layer_map, out: cpu.build_weight(z, layer_map, out),
)


def native_weight(backend: str, device: torch.device) -> NativeWeight | None:
    """The CPU backend's one-pass W build for the PyTorch path, where the requested ``backend`` allows
    native code (``auto`` and ``cpu``; never ``torch``) and the tensors are on CPU; else None. Its gate
    (the CPU backend's one) still decides per W: fp32 only, not while compiling, not under QAT."""
    if backend not in ("auto", "cpu") or device.type != "cpu" or torch.compiler.is_compiling():
        return None
    return _CPU_WEIGHT


_warned_no_cpu_kernel = False


def _cpu_lane(
    x: torch.Tensor,
    z: torch.Tensor | QuantizedZ,
    bias: torch.Tensor | None,
    layer_map: LayerMapping,
    backend: str,
) -> torch.Tensor | None:
    """A CPU call under ``auto`` or a forced ``cpu``: the CPU path's output, or None for the PyTorch path.

    This is the per-token path of decode, so it decides with one gate, the CPU backend's; under ``auto``
    one warning when the kernel cannot be built on this machine."""
    reason = cpu.unsupported_reason(z, layer_map, x, bias)
    if reason is None:
        return cpu.cpu_roast_linear(x, z, bias, layer_map)
    if backend == "cpu":
        raise RuntimeError(
            f"The CPU backend was forced ({ENV_BACKEND} or config.backend='cpu') but cannot run this call: "
            f"{reason}. Use backend='auto' (or 'torch') instead."
        )
    if isinstance(reason, cpu.Unavailable):
        global _warned_no_cpu_kernel
        if not _warned_no_cpu_kernel:
            _warned_no_cpu_kernel = True
            warnings.warn(
                f"hf-roast: the fast CPU inference path is unavailable ({reason}); generation runs on the "
                "slower PyTorch path, which builds each weight matrix per call. Install a C++ compiler (g++ "
                "or clang++, or set CXX) to enable it.",
                RuntimeWarning,
                stacklevel=4,
            )
    return None


def _compiled_cpu_lane(
    x: torch.Tensor,
    z: torch.Tensor | QuantizedZ,
    bias: torch.Tensor | None,
    layer_map: LayerMapping,
    backend: str,
) -> torch.Tensor | None:
    """A CPU call while ``torch.compile`` traces, under ``auto`` or a forced ``cpu``: the CPU path's op (one
    graph node, for any number of rows), or None for the PyTorch path, which dynamo traces instead (training,
    QAT, autocast, no compiler...)."""
    reason = cpu.op_unsupported_reason(z, layer_map, x, bias)
    if reason is None:
        return cpu.cpu_roast_linear(x, z, bias, layer_map)
    if backend == "cpu":
        raise RuntimeError(
            f"The CPU backend was forced ({ENV_BACKEND} or config.backend='cpu') but cannot run this compiled "
            f"call: {reason}. Use backend='auto' (or 'torch') instead."
        )
    return None


def roast_linear(
    x: torch.Tensor,
    z: torch.Tensor | QuantizedZ,
    bias: torch.Tensor | None,
    layer_map: LayerMapping,
    backend: str,
) -> torch.Tensor:
    """``x W^T + b`` with W read from z, on the path the config's ``backend`` (or the environment) chooses."""
    backend = requested_backend(backend)
    if x.is_cpu and backend in ("auto", "cpu"):
        if torch.compiler.is_compiling():
            out = _compiled_cpu_lane(x, z, bias, layer_map, backend)
        else:
            out = _cpu_lane(x, z, bias, layer_map, backend)
        if out is not None:
            return out
        if backend == "auto":
            return RoastLinearFunction.apply(x, z, bias, layer_map, native_weight(backend, x.device))
    path = _path(backend, x.device, (x.dtype, read_dtype(z)), layer_map)
    if path == "triton":
        from .triton.ops import triton_roast_linear

        return triton_roast_linear(x, z, bias, layer_map)
    return RoastLinearFunction.apply(x, z, bias, layer_map, native_weight(backend, x.device))


def roast_embedding(
    ids: torch.Tensor, z: torch.Tensor | QuantizedZ, layer_map: LayerMapping, dtype: torch.dtype, backend: str
) -> torch.Tensor:
    """The rows of ``ids`` read from z, on the path the config's ``backend`` (or the environment) chooses."""
    if _path(requested_backend(backend), ids.device, (dtype, read_dtype(z)), layer_map) == "triton":
        from .triton.ops import triton_roast_embedding

        return triton_roast_embedding(ids, z, layer_map, dtype)
    return RoastEmbeddingFunction.apply(ids, z, layer_map, dtype)


def materialize_weight(
    z: torch.Tensor | QuantizedZ,
    layer_map: LayerMapping,
    dtype: torch.dtype,
    backend: str,
    *,
    scratch: bool = True,
) -> torch.Tensor:
    """A module's dense W in ``dtype`` (see :func:`hf_roast.backends.pytorch.materialize_weight`), built by the
    CPU backend's loop where the ``backend`` allows native code and its gate accepts, else by PyTorch ops."""
    native = native_weight(requested_backend(backend), z.device)
    return _pytorch_weight(z, layer_map, dtype, scratch=scratch, native=native)


def layer_geometry(plan, spec) -> tuple[int, ...]:
    """A layer's mapping as the ints the ops take (:func:`hf_roast.backends.geometry.spec_geometry`), for the
    layer to compute once and hand over in its :class:`LayerMapping` (``geometry``)."""
    return tuple(spec_geometry(plan, spec))
