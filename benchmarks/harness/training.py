"""Training helpers that only the harness uses: the one-rate optimizer groups and the dense-norm init variant.

They reproduce arms measured before the library's recipe (``hf_roast.optim``) existed, so they live here, not
in the library.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_roast.checkpoint_format import STORE_NAME
from hf_roast.layers import roast_layers
from hf_roast.optim import z_weight_multiplier


def single_rate_groups(model: nn.Module, lr: float) -> tuple[list[dict], float]:
    """One learning rate for every parameter, in weight units: z gets ``lr * z_weight_multiplier``.

    The baselines' recipe (and hf-roast's before the per-group recipe above), kept so that the
    harness's arms reproduce. Returns the groups and z's multiplier (1.0 for an uncompressed model).
    """
    store = getattr(model, STORE_NAME, None)
    if store is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}], 1.0
    multiplier = z_weight_multiplier(model)
    z = store.z  # None when z is packed (model.quantize_z): nothing of it trains
    others = [p for p in model.parameters() if p.requires_grad and p is not z]
    z_groups = [{"params": [z], "lr": lr * multiplier}] if z is not None else []
    return [*z_groups, {"params": others, "lr": lr}], multiplier


@torch.no_grad()
def rescale_to_dense_norm(model: nn.Module, dense_sq: float) -> float:
    """Multiply z so the compressed target weights keep the dense weights' total Frobenius norm.

    The least-squares projection at c-fold sharing keeps about 1/c of each weight and adds the other
    c-1 weights of its slot as noise, so ||W'|| is about ||W||/sqrt(c): attention logits (Q K^T) shrink
    about c-fold, attention turns uniform and the token representations collapse. This variant
    trades the L2-optimal start for the dense model's scale. One global factor suffices because the
    stable mapper shares evenly across modules (under a compression_pattern, segments at other compressions
    shrink by other factors, and the one factor restores the total norm only). ``model`` is the compressed HF model; ``dense_sq`` the sum of
    its dense target weights' squares before compression. Returns the factor (an init variant of the
    evaluation).
    """
    roast_sq = float(
        sum(layer.materialize_weight().double().pow(2).sum() for _, layer in roast_layers(model))
    )
    factor = (dense_sq / roast_sq) ** 0.5
    getattr(model, STORE_NAME).z.mul_(factor)
    return factor
