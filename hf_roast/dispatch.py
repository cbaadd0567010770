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
from .torch_path import RoastEmbeddingFunction, RoastLinearFunction
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


def roast_linear(x: torch.Tensor, z: torch.Tensor, bias: torch.Tensor | None, lm: LayerMapping, backend: str):
    if resolve_backend(backend, x.device, (x.dtype, z.dtype)) == "triton":
        from .kernels.ops import triton_roast_linear

        return triton_roast_linear(x, z, bias, lm)
    return RoastLinearFunction.apply(x, z, bias, lm)


def roast_embedding(ids: torch.Tensor, z: torch.Tensor, lm: LayerMapping, dtype: torch.dtype, backend: str):
    if resolve_backend(backend, ids.device, (dtype, z.dtype)) == "triton":
        from .kernels.ops import triton_roast_embedding

        return triton_roast_embedding(ids, z, lm, dtype)
    return RoastEmbeddingFunction.apply(ids, z, lm, dtype)
