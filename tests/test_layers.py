"""The drop-in layers (hf_roast/layers.py): padding rows, the RNG, the weight stand-in, dtype moves."""

import torch
from torch import nn

from hf_roast import RoastConfig, RoastEmbedding, RoastLinear, get_roast_model


def test_embedding_padding_idx_is_kept_exactly_and_gets_no_gradient():
    torch.manual_seed(0)
    emb = nn.Embedding(40, 16, padding_idx=1)
    with torch.no_grad():
        emb.weight[1] = torch.randn(16)  # a pretrained pad row need not be zero
    model = nn.ModuleDict({"emb": emb})
    dense_pad = emb.weight[1].detach().clone()
    rm = get_roast_model(
        model, RoastConfig(compression=4.0, target_modules=None, compress_embeddings=True, tile=(8, 8))
    )
    layer = rm.base_model["emb"]
    assert isinstance(layer, RoastEmbedding)
    ids = torch.tensor([1, 2, 1, 5])
    out = layer(ids)
    torch.testing.assert_close(out[0], dense_pad)
    torch.testing.assert_close(out[2], dense_pad)
    out[[0, 2]].sum().backward()  # only pad rows
    assert rm.roast_store.z.grad is None or torch.all(rm.roast_store.z.grad == 0)


def test_compression_leaves_global_rng_untouched():
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    for init in ("random", "pretrained"):
        torch.manual_seed(1234)
        state = torch.get_rng_state()
        get_roast_model(_copy(model), RoastConfig(compression=2.0, tile=(8, 8), init=init))
        assert torch.equal(torch.get_rng_state(), state)


def _copy(model):
    import copy

    return copy.deepcopy(model)


class OneLinear(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.proj = nn.Linear(24, 40, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def test_weight_property_reports_shape_dtype_device_and_refuses_silent_use():
    rm = get_roast_model(OneLinear(torch.bfloat16), RoastConfig(compression=2.0, tile=(8, 8)))
    layer = rm.base_model.proj
    assert isinstance(layer, RoastLinear)
    w = layer.weight
    assert w.shape == (40, 24) and w.dtype == torch.bfloat16 and w.device.type == "cpu"
    assert torch.isnan(w).all()  # a stand-in: using it as real weights cannot go unnoticed
    assert layer.materialize_weight().dtype == torch.bfloat16
    y = rm(torch.randn(3, 24, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert rm.roast_store.z.dtype == torch.float32


def test_model_to_dtype_moves_compute_dtype():
    rm = get_roast_model(OneLinear(), RoastConfig(compression=2.0, tile=(8, 8)))
    rm.to(torch.float16)
    assert rm.base_model.proj.weight.dtype == torch.float16


def test_a_layer_hands_its_geometry_to_its_mapping_for_its_own_spec_only():
    """A layer computes the ops' ints once and hands them over in its LayerMapping (so a compiled graph reads
    one tuple, not every field of its spec); a copy of the mapping with another spec (the PyTorch path's row
    blocks, SliceOut) must not reuse them."""
    import dataclasses

    from helpers import tiny_llama

    from hf_roast.backends.geometry import geometry_of, spec_geometry

    model = get_roast_model(tiny_llama(), RoastConfig(compression=4.0, tile=(8, 8), sign="element"))
    for _, layer in model.roast_layers():
        lm = layer.layer_mapping()
        assert lm.geometry is not None and geometry_of(lm) is lm.geometry[1]
        assert geometry_of(lm) == spec_geometry(lm.plan, lm.spec)
    spec = lm.spec
    block = dataclasses.replace(lm, spec=dataclasses.replace(spec, rows=8, tile_offset=spec.tile_offset + 3))
    assert geometry_of(block) == spec_geometry(block.plan, block.spec) != geometry_of(lm)
