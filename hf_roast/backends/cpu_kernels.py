"""The CPU kernels of the ``hf_roast::`` ops (:mod:`hf_roast.backends.custom_ops`), registered on import.

On CPU two paths could implement an op, so they are registered here, at the front, rather than by either:

* normally, the C++ kernel (:data:`hf_roast.backends.cpu.ops.KERNELS`) implements the forward linear ops,
  ``roast_linear`` and ``roast_linear_packed``, for any number of rows (a fused GEMV for a few, else one
  W build and one GEMM). It has no backward and no embedding ops: on CPU, dispatch sends calls that need
  gradients, and embeddings, to the PyTorch path, and calls these ops only for inference;
* under the Triton interpreter (``TRITON_INTERPRET=1`` before the kernels are imported, which the test
  suite sets on machines without a GPU), CPU tensors are the Triton kernels' test device: every op runs
  the Triton kernel (:data:`hf_roast.backends.triton.ops.IMPLS`). The interpreter tests (tests/test_kernels.py,
  tests/test_kernel_layouts.py) call the ops on CPU tensors, forward, backward, ``opcheck`` and
  ``torch.compile`` alike, and must exercise Triton, not C++.

Why one kernel that decides per call rather than registering one implementation or the other per process:
the same test session checks both implementations (the C++ one with the interpreter switched off for the
test, :func:`triton_owns_cpu` patched), and a choice made at import time would depend on which module
happened to be imported first. The check costs a dictionary lookup per call. In production the interpreter
is never on, and dispatch (:mod:`hf_roast.backends.dispatch`) does not call these ops on CPU at all: eager
and compiled calls alike take the CPU path's own op, ``hf_roast::roast_linear_cpu``, whose kernel is C++ with
no Python around it (these kernels hand their calls to it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cpu import ops as cpu
from .custom_ops import SCHEMAS, qualname, register_kernels
from .triton import available


def triton_owns_cpu() -> bool:
    """Whether the ops' CPU kernels are the Triton kernels, run by the interpreter (tests without a GPU)."""
    return available.triton_installed() and available.interpreter_active()


def _kernel(name: str) -> Callable[..., torch.Tensor]:
    native = cpu.KERNELS.get(name)

    def kernel(*args):
        if triton_owns_cpu():
            from .triton.ops import IMPLS

            return IMPLS[name](*args)
        if native is None:
            raise NotImplementedError(
                f"{qualname(name)} has no CPU kernel outside the Triton interpreter: on CPU, hf_roast computes "
                "gradients and embeddings on the PyTorch path (call the ops through hf_roast's layers)."
            )
        return native(*args)

    kernel.__name__ = kernel.__qualname__ = f"{name}_cpu"
    return kernel


register_kernels("cpu", {name: _kernel(name) for name in SCHEMAS})
