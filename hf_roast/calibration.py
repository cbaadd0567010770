"""Activation-aware initialisation: which input columns of each target module the data actually uses.

Plain least squares treats every weight alike, so at c-fold sharing each slot of z averages c weights
whether or not the data ever reads them. What matters for the output ``y = W x`` is the error
``E||(W' - W) x||^2``, which, with the input covariance replaced by its diagonal, is
``sum_ij E[x_j^2] (W'_ij - W_ij)^2``: a least squares weighted by the mean squared input activation of
each column. AWQ and ASVD weight their compression by the same statistic. It costs one forward pass
over a few calibration batches, and the projection itself costs the same as the unweighted one.

Each module's column weights are normalised to mean 1, so that modules keep the same share of every
slot as in plain least squares; only the columns within a module are reweighted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def input_statistics(
    model: nn.Module,
    targets: list[tuple[str, nn.Module, str]],
    batches: Iterable,
    full: bool = False,
    show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Per linear / Conv1D target, ``E[x_j^2]`` per input column, or with ``full`` the whole second-moment
    matrix ``E[x x^T]`` (``cols x cols``, kept on the CPU), over all tokens of ``batches``.

    ``batches`` yields what the model's forward takes: a dict of tensors (``input_ids``,
    ``attention_mask``...) or a tensor of input ids. When a batch carries an ``attention_mask``, padded
    positions are left out of every statistic whose input is laid out per token (``[batch, seq, features]``),
    so that padding, which the model never reads, does not pull the init towards it. Inputs of another
    layout (a pooler's first-token input) count whole. Embedding targets get no statistic (uniform weights).
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    current_mask: list[torch.Tensor | None] = [None]

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0].detach().float()
            mask = current_mask[0]
            if mask is not None and x.dim() == mask.dim() + 1 and x.shape[:-1] == mask.shape:
                x = x[mask.to(x.device).bool()]
            x = x.reshape(-1, x.shape[-1])
            sq = (x.t() @ x).cpu() if full else x.pow(2).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    for name, module, kind in targets:
        if kind in ("linear", "conv1d"):
            hooks.append(module.register_forward_pre_hook(hook_for(name)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seen = 0
    try:
        for batch in tqdm(batches, desc="ROAST calibrate", unit="batch", disable=not show_progress):
            if isinstance(batch, torch.Tensor):
                current_mask[0] = None
                model(input_ids=batch.to(device))
            elif isinstance(batch, Mapping):
                inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                inputs.pop("labels", None)
                current_mask[0] = inputs.get("attention_mask")
                model(**inputs)
            else:
                raise TypeError(
                    f"calibration_data must yield dicts of tensors (tokenizer output) or tensors of input ids, "
                    f"got {type(batch).__name__}."
                )
            seen += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibration_data yielded no batch: pass a few batches of representative inputs.")
    empty = sorted(name for name in sums if counts[name] == 0)
    if empty:
        raise ValueError(
            f"Every calibration position was padding for {empty[:3]}: pass batches whose attention_mask "
            "marks some real tokens."
        )
    return {name: sums[name] / counts[name] for name in sums}


def column_weights(second_moment: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Importance of each input column: ``E[x_j^2] ** alpha``, normalised to mean 1 within the module.

    A column the data never reads gets weight 0 only in the limit; a tiny floor keeps every slot's
    weighted least squares well posed.
    """
    w = second_moment.double().clamp_min(0).pow(alpha)
    mean = w.mean()
    if not torch.isfinite(mean) or mean <= 0:
        return torch.ones_like(second_moment, dtype=torch.float32)
    w = w / mean
    return w.clamp_min(1e-6).float()


def normalized_gram(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``E[x x^T]`` scaled to mean diagonal 1 (modules keep plain least squares' shares), plus ``damping``
    times the identity: directions the calibration data never visits still pull towards plain least
    squares, which keeps the solve well posed and the init from overfitting a few batches."""
    g = gram.double()
    mean_diag = g.diagonal().mean()
    if not torch.isfinite(mean_diag) or mean_diag <= 0:
        return torch.eye(g.shape[0], dtype=torch.float32)
    g = g / mean_diag
    g.diagonal().add_(damping)
    return g.float()


@torch.no_grad()
def output_error_solve(
    z0: torch.Tensor,
    modules: list[tuple],
    num_slots: int,
    iterations: int = 50,
    tolerance: float = 1e-4,
    show_progress: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict]:
    """Least squares in the layers' *outputs*: ``min_z sum_l tr((W_l(z) - W_l) G_l (W_l(z) - W_l)^T)``.

    ``modules`` holds ``(layer_mapping, dense_weight, G)`` with ``G`` a normalised Gram matrix (or None
    for the identity). The objective is quadratic in z and its normal equations ``H z = b`` are solved
    by conjugate gradients from ``z0``, where ``H v = sum_l A_l^T (A_l v) G_l`` and ``A_l`` materialises
    module l from z (its adjoint is the dz scatter of the backward pass). Each iteration costs one
    materialisation, one ``rows x cols x cols`` product and one scatter per module. Returns z and the
    relative output error before and after. ``backend`` is the store's (``RoastConfig.backend``): it decides
    whether native code may build the W's (:func:`hf_roast.backends.dispatch.materialize_weight`).
    """
    from .backends.dispatch import materialize_weight
    from .backends.pytorch import mapping_adjoint

    def apply_g(w: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        return w if g is None else w @ g.to(w.device)

    def hessian(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(num_slots, dtype=torch.float32, device=v.device)
        for layer_map, _, g in modules:
            w = materialize_weight(v, layer_map, torch.float32, backend, scratch=False)
            out += mapping_adjoint(apply_g(w, g), layer_map, num_slots)
        return out

    def relative_error(v: torch.Tensor) -> float:
        err = ref = 0.0
        for layer_map, w_dense, g in modules:
            e = materialize_weight(v, layer_map, torch.float32, backend, scratch=False) - w_dense
            err += float((apply_g(e, g) * e).sum())
            ref += float((apply_g(w_dense, g) * w_dense).sum())
        return (max(err, 0.0) / ref) ** 0.5 if ref > 0 else 0.0

    b = torch.zeros(num_slots, dtype=torch.float32, device=z0.device)
    for layer_map, w_dense, g in modules:
        b += mapping_adjoint(apply_g(w_dense, g), layer_map, num_slots)
    before = relative_error(z0)
    z = z0.clone().float()
    r = b - hessian(z)
    p = r.clone()
    rs = float(r.double().pow(2).sum())
    b_norm = float(b.double().pow(2).sum()) ** 0.5
    done = 0
    for _ in tqdm(range(iterations), desc="ROAST output-error solve", disable=not show_progress):
        if rs**0.5 <= tolerance * b_norm:
            break
        hp = hessian(p)
        curvature = float((p.double() * hp.double()).sum())
        if curvature <= 0:
            break
        alpha = rs / curvature
        z.add_(p, alpha=alpha)
        r.sub_(hp, alpha=alpha)
        rs_new = float(r.double().pow(2).sum())
        p.mul_(rs_new / rs).add_(r)
        rs = rs_new
        done += 1
    after = relative_error(z)
    return z, {"output_error_before": before, "output_error_after": after, "iterations": done}
