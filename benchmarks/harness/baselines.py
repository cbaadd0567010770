"""The baselines hf-roast is compared against: magnitude pruning with a fixed mask, and a smaller model.

Pruning acts on exactly the modules hf-roast would compress (same ``find_targets``), keeps the same
number of values as hf-roast's shared array, and then fine-tunes with the mask fixed. Its storage is
counted honestly: the kept values *plus* the sparsity pattern (a bitmask, or CSR column indices).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import prune

from hf_roast.compress import dense_weight
from hf_roast.config import RoastConfig
from hf_roast.quant import QuantizedZ, fake_quantize_groups
from hf_roast.targets import find_targets


def kept_per_module(numels: list[int], keep_total: int) -> list[int]:
    """Split ``keep_total`` over modules in proportion to their size (uniform sparsity), summing exactly."""
    total = sum(numels)
    if not 0 < keep_total <= total:
        raise ValueError(f"keep_total={keep_total} must be in [1, {total}] (the number of target weights).")
    raw = [n * keep_total / total for n in numels]
    kept = [min(n, math.floor(r)) for n, r in zip(numels, raw)]
    # largest remainders get the leftover values, so the total matches hf-roast's z exactly
    order = sorted(range(len(numels)), key=lambda i: raw[i] - kept[i], reverse=True)
    for i in order[: keep_total - sum(kept)]:
        kept[i] += 1
    return kept


@torch.no_grad()
def magnitude_prune(
    model: nn.Module, config: RoastConfig, keep_total: int, random_generator: torch.Generator | None = None
) -> dict:
    """Prune the target modules to ``keep_total`` kept weights, layer-wise by magnitude, with a fixed mask.

    With ``random_generator`` the kept weights are a seeded uniform draw instead (random pruning at init,
    the control that tells whether the magnitude criterion matters at all).

    The mask is installed with ``torch.nn.utils.prune.custom_from_mask``: the forward uses
    ``weight_orig * weight_mask``, so pruned weights get zero gradient and stay zero while fine-tuning.
    Call :func:`finalize_pruning` before counting or saving. Returns the storage accounting.
    """
    targets = find_targets(model, config)  # pruning acts on the modules hf-roast would compress
    weights = [module.weight for _, module, _ in targets]
    kept = kept_per_module([w.numel() for w in weights], keep_total)
    rows_total = 0
    for (_, module, kind), k in zip(targets, kept):
        w = module.weight
        mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        if k > 0:
            score = (
                w.detach().abs().flatten()
                if random_generator is None
                else torch.rand(w.numel(), generator=random_generator).to(w.device)
            )
            mask[torch.topk(score, k, sorted=False).indices] = True
        prune.custom_from_mask(module, "weight", mask.view_as(w).to(w.dtype))
        rows_total += dense_weight(module, kind).shape[0] if kind != "embedding" else w.shape[0]
    return pruning_storage(
        [w.numel() for w in weights], sum(kept), rows_total, element_size=weights[0].element_size()
    )


def pruning_storage(numels: list[int], kept_values: int, rows_total: int, element_size: int = 4) -> dict:
    """Bytes a pruned set of matrices needs: values plus either a 1-bit mask or CSR indices.

    CSR stores an int16 column index per kept value (every dimension here is < 32768) and an int32 row
    pointer per row (+1 per matrix, ignored). The headline counts the cheaper of the two patterns.
    """
    dense_values = sum(numels)
    values_bytes = kept_values * element_size
    bitmask_bytes = math.ceil(dense_values / 8)
    csr_bytes = kept_values * 2 + rows_total * 4
    return {
        "dense_values": dense_values,
        "kept_values": kept_values,
        "values_bytes": values_bytes,
        "bitmask_bytes": bitmask_bytes,
        "csr_index_bytes": csr_bytes,
        "index_overhead_bytes": min(bitmask_bytes, csr_bytes),
        "index_format": "bitmask" if bitmask_bytes <= csr_bytes else "csr-int16",
        "stored_bytes": values_bytes + min(bitmask_bytes, csr_bytes),
    }


@torch.no_grad()
def round_to_nearest(model: nn.Module, config: RoastConfig, bits: int, group_size: int) -> dict:
    """Per-group round-to-nearest quantisation of the target modules' dense weights, in place (the
    bitsandbytes-style baseline): groups of ``group_size`` contiguous values, one fp32 absmax scale each, the
    same symmetric grid as a quantised z (:mod:`hf_roast.quant`). Returns the storage accounting."""
    values = stored = 0
    for _, module, _ in find_targets(model, config):
        w = module.weight
        flat = w.detach().float().reshape(-1)
        pad = -flat.numel() % group_size  # a partial last group: zero padding does not change its absmax
        padded = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
        w.copy_(fake_quantize_groups(padded, bits, group_size)[: flat.numel()].view_as(w).to(w.dtype))
        values += flat.numel()
        stored += QuantizedZ.packed_nbytes(flat.numel(), bits, group_size)
    return {"values": values, "stored_bytes": stored}


def finalize_pruning(model: nn.Module) -> int:
    """Fold every fixed mask into its weight (``prune.remove``); returns the number of nonzero pruned weights."""
    nonzero = 0
    for module in model.modules():
        if hasattr(module, "weight_mask"):
            prune.remove(module, "weight")
            nonzero += int((module.weight != 0).sum().item())
    return nonzero


def truncate_layers(model: nn.Module, num_layers: int) -> nn.Module:
    """Keep the first ``num_layers`` transformer blocks (the 'smaller model' baseline), in place."""
    for path in ("bert.encoder.layer", "encoder.layer", "model.layers", "transformer.h"):
        parent_path, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path)
        except AttributeError:
            continue
        layers = getattr(parent, attr, None)
        if isinstance(layers, nn.ModuleList):
            if not 0 <= num_layers <= len(layers):
                raise ValueError(f"num_layers={num_layers} must be in [0, {len(layers)}].")
            setattr(parent, attr, nn.ModuleList(list(layers)[:num_layers]))
            for key in ("num_hidden_layers", "n_layer"):
                if hasattr(model.config, key):
                    setattr(model.config, key, num_layers)
            if getattr(model.config, "layer_types", None):
                model.config.layer_types = model.config.layer_types[:num_layers]
            return model
    raise ValueError(f"Cannot find the transformer blocks of {type(model).__name__} to truncate.")


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(values, bytes) of the model's unique parameters and persistent buffers-free weights."""
    seen, n, b = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n += p.numel()
        b += p.numel() * p.element_size()
    return n, b
