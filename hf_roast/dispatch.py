"""Choose the execution path of a ROAST op: fused Triton kernels on CUDA, the PyTorch path elsewhere.

``HF_ROAST_BACKEND`` (``auto`` / ``torch`` / ``triton``) overrides the config's ``backend`` field.
``auto`` takes the kernels for CUDA tensors of a supported dtype when triton is installed, and the
PyTorch path otherwise; a forced ``triton`` that cannot run raises an error saying why, rather than
silently falling back.
"""

from __future__ import annotations

import os

import torch

from .mapping import LayerMapping
from .quant import QuantizedZ
from .torch_path import RoastEmbeddingFunction, RoastLinearFunction, read_dtype
from .vocab import BACKENDS

ENV_BACKEND = "HF_ROAST_BACKEND"


def requested_backend(requested: str) -> str:
    """The environment variable if set, else the config's value; validated."""
    backend = os.environ.get(ENV_BACKEND) or requested or "auto"
    if backend not in BACKENDS:
        source = f"{ENV_BACKEND}={backend!r}" if os.environ.get(ENV_BACKEND) else f"backend={backend!r}"
        raise ValueError(f"{source}: use {', '.join(map(repr, BACKENDS[:-1]))} or {BACKENDS[-1]!r}.")
    return backend


def resolve_backend(requested: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> str:
    """'torch' or 'triton' for tensors on ``device`` of ``dtypes``; a clear error when a forced path cannot run."""
    backend = requested_backend(requested)
    if backend == "torch" or device.type == "meta":
        return "torch"  # meta tensors: shape inference, which the PyTorch path does for free
    from .kernels_available import triton_unavailable_reason

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


def _path(backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...], lm: LayerMapping) -> str:
    """As :func:`resolve_backend`; quantisation-aware training (an fp32 master read through its grid) runs on
    the PyTorch path only: ``auto`` takes it, a forced ``triton`` raises."""
    path = resolve_backend(backend, device, dtypes)
    if path == "triton" and lm.fake_quant is not None:
        if requested_backend(backend) == "triton":
            raise RuntimeError(
                f"{lm.spec.name}: quantisation-aware training (z_qat=True) runs on the PyTorch path only; the "
                "Triton kernels read packed z (model.quantize_z) or float z. Use backend='torch' (or 'auto')."
            )
        return "torch"
    return path


def roast_linear(
    x: torch.Tensor, z: torch.Tensor | QuantizedZ, bias: torch.Tensor | None, lm: LayerMapping, backend: str
):
    if _path(backend, x.device, (x.dtype, read_dtype(z)), lm) == "triton":
        from .kernels.ops import triton_roast_linear

        return triton_roast_linear(x, z, bias, lm)
    return RoastLinearFunction.apply(x, z, bias, lm)


def roast_embedding(
    ids: torch.Tensor, z: torch.Tensor | QuantizedZ, lm: LayerMapping, dtype: torch.dtype, backend: str
):
    if _path(backend, ids.device, (dtype, read_dtype(z)), lm) == "triton":
        from .kernels.ops import triton_roast_embedding

        return triton_roast_embedding(ids, z, lm, dtype)
    return RoastEmbeddingFunction.apply(ids, z, lm, dtype)
