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
is never on; dispatch (:mod:`hf_roast.backends.dispatch`) routes a compiled CPU call to the op only when
the C++ kernel implements it, and an eager call straight to the kernel's function (the same code, without the
dispatcher's overhead on the per-token path).
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


def cpu_op_reason(z, layer_map, x: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """None when a (compiled) CPU call can go through the op and the C++ kernel will run it; else why not."""
    if _triton_owns_cpu_constant():
        return "the Triton interpreter owns the ops' CPU kernels (tests)"
    return cpu.op_unsupported_reason(z, layer_map, x, bias)


@torch.compiler.assume_constant_result
def _triton_owns_cpu_constant() -> bool:
    """:func:`triton_owns_cpu` for ``torch.compile`` (sys.modules and the environment are no graph ops)."""
    return triton_owns_cpu()
