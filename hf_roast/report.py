"""What a compressed model stores against what its dense original would: the compression report."""

from __future__ import annotations

from torch import nn

from .checkpoint_format import STORE_NAME
from .layers import roast_layers


def unique_parameters(model: nn.Module):
    """Every parameter of ``model`` once, even when tied."""
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def _block(dense_n, dense_b, stored_n, stored_b) -> dict:
    return {
        "dense_parameters": dense_n,
        "stored_parameters": stored_n,
        "dense_bytes": dense_b,
        "stored_bytes": stored_b,
        "ratio": dense_n / stored_n,
        "bytes_ratio": dense_b / stored_b,
    }


def compression_report(model: nn.Module) -> dict:
    """Dense vs stored parameter counts and bytes of the compressed HF ``model``, over the target modules
    and the whole model. The layers' declared owned tensors (:attr:`RoastLayer.owned_tensor_names`) that
    are buffers, such as an embedding's padding row, count as stored beside the parameters."""
    store = getattr(model, STORE_NAME)
    layers = roast_layers(model)
    dense_target = sum(m.spec.numel for _, m in layers)
    dense_target_bytes = sum(m.spec.numel * m._dtype_probe.element_size() for _, m in layers)
    z = store.z  # None when packed
    stored_target, stored_target_bytes = store.plan.num_slots, store.z_nbytes
    other = [p for p in unique_parameters(model) if p is not z]
    other_buffers = [
        t for _, m in layers for t in m.owned_tensors().values() if not isinstance(t, nn.Parameter)
    ]
    other_n = sum(p.numel() for p in other) + sum(b.numel() for b in other_buffers)
    other_bytes = sum(p.numel() * p.element_size() for p in other) + sum(
        b.numel() * b.element_size() for b in other_buffers
    )
    plan = store.plan
    return {
        "target": _block(dense_target, dense_target_bytes, stored_target, stored_target_bytes),
        "model": _block(
            dense_target + other_n,
            dense_target_bytes + other_bytes,
            stored_target + other_n,
            stored_target_bytes + other_bytes,
        ),
        "num_modules": len(layers),
        "mapper": plan.mapper,
        "tile": list(plan.tile),
        "sign": plan.sign,
        "seed": plan.seed,
        "scaler": store.scaler,
        "mapping_version": plan.mapping_version,
        "z_bits": store.z_bits,
        "z_group_size": store.z_group_size if store.z_bits < 16 else None,
        "z_qat": store.z_qat,
        "z_bytes": store.z_nbytes,
    }
