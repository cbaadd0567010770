"""Choose the execution path of a ROAST op: fused Triton kernels on CUDA, the PyTorch path elsewhere.

``HF_ROAST_BACKEND`` (``auto`` / ``torch`` / ``triton``) overrides the config's ``backend`` field.
"""

from __future__ import annotations

import os

import torch

from .functional import LayerMapping, RoastEmbeddingFunction, RoastLinearFunction

ENV_BACKEND = "HF_ROAST_BACKEND"


def resolve_backend(requested: str, device: torch.device) -> str:
    """'torch' or 'triton' for a tensor on ``device``; a clear error when a forced path cannot run."""
    backend = os.environ.get(ENV_BACKEND, requested) or "auto"
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"{ENV_BACKEND}={backend!r}: use 'auto', 'torch' or 'triton'.")
    if backend == "torch":
        return "torch"
    from .kernels_available import triton_unavailable_reason

    reason = triton_unavailable_reason(device)
    if backend == "triton" and reason is not None:
        raise RuntimeError(f"The Triton backend was forced but cannot run: {reason}. Use backend='torch' instead.")
    # auto: the kernels only where they pay off (CUDA); the interpreter is for tests that force them.
    return "triton" if reason is None and device.type == "cuda" else "torch"


def roast_linear(x: torch.Tensor, z: torch.Tensor, bias: torch.Tensor | None, lm: LayerMapping, backend: str):
    if resolve_backend(backend, x.device) == "triton":
        from .kernels.ops import triton_roast_linear

        return triton_roast_linear(x, z, bias, lm)
    return RoastLinearFunction.apply(x, z, bias, lm)


def roast_embedding(ids: torch.Tensor, z: torch.Tensor, lm: LayerMapping, dtype: torch.dtype, backend: str):
    if resolve_backend(backend, ids.device) == "triton":
        from .kernels.ops import triton_roast_embedding

        return triton_roast_embedding(ids, z, lm, dtype)
    return RoastEmbeddingFunction.apply(ids, z, lm, dtype)
