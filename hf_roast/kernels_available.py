"""Whether the Triton kernels can run for a given device, and if not, why."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the kernels can run on ``device``; otherwise a sentence saying why not."""
    if not _triton_installed():
        return "triton is not installed (pip install 'hf-roast[triton]')"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None  # the interpreter runs the kernels on CPU tensors (tests)
    if device.type != "cuda":
        return f"the tensors are on {device.type}, and the kernels need CUDA (or TRITON_INTERPRET=1)"
    return None
