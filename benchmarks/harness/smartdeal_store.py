"""What a SmartDeal weight stores, packed, and its safetensors round trip.

Per matrix, four tensors (``<module>.mask`` ... ``<module>.basis_scales``):

* ``mask``: uint8, C's non-zero pattern, one bit per coefficient (row-major over ``(G, m, rank)``, bit ``i % 8`` of
  byte ``i // 8``);
* ``codes``: uint8, one 5-bit code per non-zero in the mask's order, bit-packed the same way: bit 4 the sign, bits
  0-3 the exponent ``e`` of ``2**-e``;
* ``basis``: int8 ``(G, rank, chunk)``; ``basis_scales``: fp32 ``(G, rank)``.

The file's metadata holds each matrix's shape and layout (a JSON string, not counted: it is a few dozen bytes per
matrix, like a checkpoint's config). The bytes the arm reports are the sum of these tensors' bytes, which is what
the test checks against the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .bitpack import pack_bits, unpack_bits
from .smartdeal import (
    CODE_BITS,
    DecodedSmartDealLinear,
    Layout,
    SmartDealLinear,
    basis_codes,
    basis_scales,
    dequantize_basis,
    exponents_of,
    power_of_two,
    replace_module,
    smartdeal_layers,
)


def export(layer: SmartDealLinear) -> dict[str, torch.Tensor]:
    """The stored tensors of a trained layer (what its forward computes, exactly)."""
    cq = (power_of_two(layer.coefficients) * layer.mask).detach()
    nonzero = cq != 0
    values = cq[nonzero]
    codes = ((values < 0).to(torch.int64) << 4) | exponents_of(values)
    scales = basis_scales(layer.basis)
    return {
        "mask": pack_bits(nonzero, 1),
        "codes": pack_bits(codes, CODE_BITS),
        "basis": basis_codes(layer.basis, scales),
        "basis_scales": scales,
    }


def decode(tensors: dict[str, torch.Tensor], meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(C with its exact power-of-two values, B on its int8 grid) from :func:`export`'s tensors."""
    layout = Layout(**meta["layout"])
    g, m, _ = layout.shapes(meta["out_features"], meta["in_features"])
    shape = (g, m, layout.rank)
    nonzero = unpack_bits(tensors["mask"], g * m * layout.rank, 1, signed=False).bool().view(shape)
    codes = unpack_bits(tensors["codes"], int(nonzero.sum()), CODE_BITS, signed=False).long()
    sign = 1.0 - 2.0 * (codes >> 4).float()
    cq = torch.zeros(shape, device=nonzero.device)
    cq[nonzero] = sign * torch.ldexp(torch.ones_like(sign), -(codes & 15))
    return cq, dequantize_basis(tensors["basis"], tensors["basis_scales"])


def _meta(layer: SmartDealLinear) -> dict:
    lay = layer.layout
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "layout": {"chunk": lay.chunk, "rank": lay.rank, "rows_per_basis": lay.rows_per_basis},
    }


def stored_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Every SmartDeal layer's packed tensors (``<name>.<tensor>``) and its metadata."""
    tensors, meta = {}, {}
    for name, layer in smartdeal_layers(model):
        if not isinstance(layer, SmartDealLinear):
            raise TypeError(f"{name} is already decoded; export the trained SmartDealLinear.")
        tensors.update({f"{name}.{k}": v.contiguous().cpu() for k, v in export(layer).items()})
        meta[name] = _meta(layer)
    return tensors, meta


def tensor_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save(model: nn.Module, path: str | Path) -> int:
    """Write the SmartDeal layers' stored tensors to a safetensors file; returns their bytes."""
    from safetensors.torch import save_file

    tensors, meta = stored_tensors(model)
    save_file(tensors, str(path), metadata={"smartdeal": json.dumps(meta)})
    return tensor_nbytes(tensors)


def load(model: nn.Module, path: str | Path) -> nn.Module:
    """Replace each listed layer of ``model`` (a SmartDeal layer, or the dense linear it came from: its bias is
    kept) by the decoded stored weight; returns ``model``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["smartdeal"])
        for name, info in meta.items():
            parts = {k: f.get_tensor(f"{name}.{k}") for k in ("mask", "codes", "basis", "basis_scales")}
            cq, bq = decode(parts, info)
            old = model.get_submodule(name)
            device = next(old.parameters()).device
            new = DecodedSmartDealLinear(cq, bq, info["in_features"], info["out_features"], old.bias)
            replace_module(model, name, new.to(device))
    return model


def decode_in_place(model: nn.Module) -> None:
    """Swap every trained SmartDeal layer for its stored form, decoded (the arm is scored as it is stored)."""
    for name, layer in smartdeal_layers(model):
        if isinstance(layer, SmartDealLinear):
            cq, bq = decode(export(layer), _meta(layer))
            device = layer.basis.device
            new = DecodedSmartDealLinear(
                cq.to(device), bq.to(device), layer.in_features, layer.out_features, layer.bias
            )
            replace_module(model, name, new)
