"""Choose the execution path of a ROAST op: fused Triton kernels on CUDA, the CPU gather-GEMV for inference
on CPU, the PyTorch path elsewhere.

``HF_ROAST_BACKEND`` (``auto`` / ``torch`` / ``triton`` / ``cpu``) overrides the config's ``backend`` field.
``auto`` takes the kernels for CUDA tensors of a supported dtype when triton is installed; on CPU, a linear
call that needs no gradient and has at most ``cpu_path.MAX_ROWS`` rows (decode, short prompts) takes the
CPU path (:mod:`hf_roast.cpu_path`; z fp32, bf16, fp16 or packed int8 / 4-bit), and every other call the
PyTorch path. Quantisation-aware training (``z_qat``: an fp32 master read through its grid) always takes the
PyTorch path, in training and in eval alike. A forced ``triton`` or ``cpu``
that cannot run raises an error saying why, rather than silently falling back; ``torch`` switches both off.
Embeddings take the PyTorch path on CPU under every backend: it already gathers only the looked-up rows.
Where ``auto`` would take the CPU path but no C++ compiler can build it, one warning says so and the
PyTorch path runs.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import cpu_path
from .mapping import LayerMapping
from .quant import QuantizedZ
from .torch_path import RoastEmbeddingFunction, RoastLinearFunction, read_dtype
from .vocab import BACKENDS, ENV_BACKEND


def requested_backend(requested: str) -> str:
    """The environment variable if set, else the config's value; validated."""
    backend = os.environ.get(ENV_BACKEND) or requested or "auto"
    if backend not in BACKENDS:
        source = f"{ENV_BACKEND}={backend!r}" if os.environ.get(ENV_BACKEND) else f"backend={backend!r}"
        raise ValueError(f"{source}: use {', '.join(map(repr, BACKENDS[:-1]))} or {BACKENDS[-1]!r}.")
    return backend


def resolve_backend(requested: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> str:
    """'torch', 'triton' or 'cpu' for tensors on ``device`` of ``dtypes``; a clear error when a forced path
    cannot run. 'cpu' only when forced: ``auto`` chooses it per call in :func:`roast_linear`, by rows."""
    backend = requested_backend(requested)
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
    from .backends.triton.available import triton_unavailable_reason

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


_warned_no_cpu_kernel = False


def cpu_path_reason(
    x: torch.Tensor, z: torch.Tensor | QuantizedZ, bias: torch.Tensor | None, layer_map: LayerMapping
) -> str | None:
    """None when the CPU path can run this linear call; otherwise why not (grad, compile, autocast, shape...).

    Decode runs every check once per layer and token, so they are ordered to fail fast in training (the
    gradient check first) and each costs well under a microsecond."""
    if torch.is_grad_enabled() and (
        x.requires_grad
        or (not isinstance(z, QuantizedZ) and z.requires_grad)  # a packed z is no parameter
        or (bias is not None and bias.requires_grad)
    ):
        return "the call needs gradients (training), and the CPU path is forward-only"
    if layer_map.fake_quant is not None:
        return "quantisation-aware training reads z through its grid on the PyTorch path"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing, and the CPU kernel is opaque to it"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on; the PyTorch path applies its casts"
    return cpu_path.unsupported_reason(x, z, layer_map)


def _path(
    backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...], layer_map: LayerMapping
) -> str:
    """As :func:`resolve_backend`; quantisation-aware training (an fp32 master read through its grid) runs on
    the PyTorch path only: ``auto`` takes it, a forced ``triton`` raises."""
    path = resolve_backend(backend, device, dtypes)
    if path == "triton" and layer_map.fake_quant is not None:
        if requested_backend(backend) == "triton":
            raise RuntimeError(
                f"{layer_map.spec.name}: quantisation-aware training (z_qat=True) runs on the PyTorch path only; the "
                "Triton kernels read packed z (model.quantize_z) or float z. Use backend='torch' (or 'auto')."
            )
        return "torch"
    return path


def _cpu_lane(
    x: torch.Tensor,
    z: torch.Tensor | QuantizedZ,
    bias: torch.Tensor | None,
    layer_map: LayerMapping,
    backend: str,
) -> torch.Tensor | None:
    """A CPU call under ``auto`` or a forced ``cpu``: the CPU path's output, or None for the PyTorch path.

    This is the per-token path of decode, so it decides with as few checks as possible: the backend, then
    :func:`cpu_path_reason`, then whether the kernel is built (one warning under ``auto`` when it cannot be)."""
    reason = cpu_path_reason(x, z, bias, layer_map)
    if reason is None:
        reason = cpu_path.unavailable_reason()
        if reason is None:
            return cpu_path.cpu_roast_linear(x, z, bias, layer_map)
        if backend == "auto":
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
    if backend == "cpu":
        raise RuntimeError(
            f"The CPU backend was forced ({ENV_BACKEND} or config.backend='cpu') but cannot run this call: "
            f"{reason}. Use backend='auto' (or 'torch') instead."
        )
    return None


def roast_linear(
    x: torch.Tensor,
    z: torch.Tensor | QuantizedZ,
    bias: torch.Tensor | None,
    layer_map: LayerMapping,
    backend: str,
):
    if x.is_cpu:
        requested = requested_backend(backend)
        if requested in ("auto", "cpu"):
            out = _cpu_lane(x, z, bias, layer_map, requested)
            if out is not None:
                return out
            if requested == "auto":
                return RoastLinearFunction.apply(x, z, bias, layer_map)
    path = _path(backend, x.device, (x.dtype, read_dtype(z)), layer_map)
    if path == "triton":
        from .backends.triton.ops import triton_roast_linear

        return triton_roast_linear(x, z, bias, layer_map)
    return RoastLinearFunction.apply(x, z, bias, layer_map)


def roast_embedding(
    ids: torch.Tensor, z: torch.Tensor | QuantizedZ, layer_map: LayerMapping, dtype: torch.dtype, backend: str
):
    if _path(backend, ids.device, (dtype, read_dtype(z)), layer_map) == "triton":
        from .backends.triton.ops import triton_roast_embedding

        return triton_roast_embedding(ids, z, layer_map, dtype)
    return RoastEmbeddingFunction.apply(ids, z, layer_map, dtype)
