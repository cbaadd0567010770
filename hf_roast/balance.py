"""Module-balanced gradients for the shared array (``RoastConfig.module_balance``).

With global sharing, slot j of ``z`` receives the sum of the gradients of every weight mapped to it, from
several modules. Adam then normalises that sum per slot, so the slot steps in the direction of whichever
module has the largest gradient there. Across a transformer those sizes differ by two orders of magnitude
(measured on a 4-layer byte-level Llama from scratch: the query and key projections of layers 1-3 get
dW with an RMS of ~1e-5, the value, output and MLP projections ~1e-4 to 1e-3), so the small-gradient
modules are moved by the others' gradients and barely learn. The STABLE-RPS scalers rescale each *slot*,
which Adam undoes; this rescales each *module's contribution* before the sum.

Each compressed layer passes z through :class:`BalanceModuleGradient` (an identity in the forward). Its
backward receives that layer's own dz (autograd hands every use of z its own gradient before summing
them) and multiplies it by ``ref / rms_l``: ``rms_l`` is a running RMS of the module's dz over the slots
it touches, ``ref`` the mean of those RMS over the modules, so every module pulls on its slots alike
and z's gradient keeps its overall size (gradient clipping sees the usual scale). The state is one
running mean square and one step count per module (a non-persistent buffer of the store): nothing
z-sized is kept. It sits outside the execution paths, so the PyTorch path and the Triton kernels
see the same balanced gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BALANCE_BETA = 0.95
"""Decay of the running mean square (Adam's beta2 of the from-scratch recipe)."""


class BalanceModuleGradient(torch.autograd.Function):
    """Identity on z; in backward, scales one module's dz to the modules' common RMS (see module doc)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, state: torch.Tensor, index: int) -> torch.Tensor:
        ctx.state = state
        ctx.index = index
        return z.view_as(z)

    @staticmethod
    def backward(ctx, dz: torch.Tensor):
        return balanced(dz, ctx.state, ctx.index), None, None


def slot_mean_square(dz: torch.Tensor) -> torch.Tensor:
    """Mean square of one module's dz over the slots it touches (nonzero), in fp32: the size of its pull on
    each of them, whatever the share of z it reads."""
    dz = dz.float()
    return dz.pow(2).sum() / torch.count_nonzero(dz).clamp_min(1)


@torch.no_grad()
def balanced(dz: torch.Tensor, state: torch.Tensor, index: int, beta: float = BALANCE_BETA) -> torch.Tensor:
    """``dz * ref / rms_index`` after folding this dz into ``state`` (row 0: running mean square of each
    module's dz over its nonzero slots; row 1: steps seen). Tensor ops only: no host synchronisation."""
    acc = dz.float()
    state[0, index] = beta * state[0, index] + (1 - beta) * slot_mean_square(acc)
    state[1, index] += 1
    corrected = state[0] / (1 - beta ** state[1].clamp_min(1))
    rms = corrected.sqrt()  # 0 for modules not seen yet: they add nothing to the sum, and are not counted
    ref = rms.sum() / (state[1] > 0).sum().clamp_min(1)
    factor = torch.where(rms[index] > 0, ref / rms[index].clamp_min(torch.finfo(torch.float32).tiny), 1.0)
    return (acc * factor).to(dz.dtype)


def balance_state(num_modules: int, device=None) -> torch.Tensor:
    """A fresh state for :func:`balanced`: [2, num_modules] zeros."""
    return torch.zeros(2, num_modules, dtype=torch.float32, device=device)


def module_gradients(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each compressed module's own dz for the loss ``loss_fn()`` computes (a forward pass of ``model``), by
    module name: the gradients that autograd sums into ``z.grad``, before the sum (and before any balance).

    Every layer reads z through a view of its own while ``loss_fn`` runs; the gradient of the loss with
    respect to each view is that module's contribution. ``z.grad`` is left untouched.
    """
    from .checkpoint_format import STORE_NAME

    store = getattr(model, STORE_NAME, None)
    if store is None:
        raise ValueError("module_gradients needs a model returned by get_roast_model (it has no shared z).")
    if store.z is None or not store.z.requires_grad:
        raise ValueError("z is packed or frozen: it has no gradient to split by module.")
    views: dict[str, torch.Tensor] = {}
    store._module_views = views
    try:
        with torch.enable_grad():
            loss = loss_fn()
    finally:
        store._module_views = None
    grads = torch.autograd.grad(loss, list(views.values()))
    return dict(zip(views, grads))
