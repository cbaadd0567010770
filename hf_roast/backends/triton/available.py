"""Whether the Triton kernels can run for a given device and dtype, and if not, why."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_MODULE = "hf_roast.backends.triton.roast_matmul"


# once: cheap, and trivial for torch.compile
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_installed() -> bool:
    """Whether triton can be imported (found once, at import)."""
    return _triton_installed()


def interpreter_active() -> bool:
    """Whether the kernels run under the Triton interpreter (on CPU tensors).

    ``triton.jit`` decides at decoration time, so once the kernel module is imported its own flag is
    the truth; before that, the environment variable is.
    """
    module = sys.modules.get(_KERNEL_MODULE)
    if module is not None:
        return bool(module.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable_reason(device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> str | None:
    """None when the kernels can run on ``device`` for tensors of ``dtypes``; otherwise a sentence saying why not."""
    if not _triton_installed():
        return "triton is not installed (pip install 'hf-roast[triton]')"
    for dtype in dtypes:
        if dtype not in KERNEL_DTYPES:
            return f"the kernels support float32, bfloat16 and float16, not {dtype}"
    if device.type == "cuda" or interpreter_active():
        return None  # the interpreter runs the kernels on CPU tensors (tests)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return (
            "TRITON_INTERPRET=1 was set after the kernels were compiled for the GPU; set it before "
            "hf_roast's kernels (and triton) are first imported"
        )
    return f"the tensors are on {device.type}, and the kernels need CUDA (or TRITON_INTERPRET=1)"
