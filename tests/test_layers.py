"""The PyTorch execution path against a dense reference built element by element from the mapping."""

import pytest
import torch
from torch import nn

from hf_roast import RoastConfig, RoastEmbedding, RoastLinear, get_roast_model, torch_path
from hf_roast.mapping import MAPPERS, SIGNS, LayerMapping, MappingPlan, ModuleSpec, gradient_scaler
from hf_roast.torch_path import RoastEmbeddingFunction, RoastLinearFunction


def make_plan(mapper, sign, shapes, compression=2.0, tile=(8, 16)):
    mods = [ModuleSpec(f"m{i}", "linear", r, c, 0.5 + i) for i, (r, c) in enumerate(shapes)]
    return MappingPlan.build(mods, mapper=mapper, sign=sign, seed=11, tile=tile, compression=compression)


def layer_mapping(plan, spec, scaler_inv=None):
    slots = plan.tile_slots(spec) if plan.is_tiled else None
    return LayerMapping(plan, spec, slots, plan.tile_scales(spec), scaler_inv)


def reference_weight(plan, spec, z):
    """W[r, c] = lambda * g * z[h(r, c)], gathered element by element (autograd-tracked)."""
    rows = torch.arange(spec.rows)
    index, sign = plan.element_index(spec, rows)
    tr, tc = plan.tile
    n_tc = spec.n_tile_cols(plan.tile)
    tile_of = (rows[:, None] // tr) * n_tc + torch.arange(spec.cols)[None, :] // tc
    scale = plan.tile_scales(spec)[tile_of].double()
    if sign is not None:
        scale = scale * sign
    return z[index] * scale, index, scale


@pytest.mark.parametrize("mapper", MAPPERS)
@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("row_block", [None, 1, 600], ids=["whole-W", "block-per-tile-row", "blocks-of-2"])
def test_linear_forward_and_gradients_match_dense_reference(mapper, sign, rows, row_block, monkeypatch):
    """Also with W built and used in blocks of tile rows (as a large W is): the same numbers."""
    if row_block is not None:
        monkeypatch.setattr(torch_path, "ROW_BLOCK_WEIGHTS", row_block)
    shapes = [(37, 19), (5, 37)]  # neither dim a multiple of the 8x16 tile; a 5-row layer is all edge
    plan = make_plan(mapper, sign, shapes)
    if row_block is not None and plan.is_tiled:
        expected_blocks = {1: 5, 600: 3}[row_block]  # 37 rows = 5 tile rows of 8; 2 tile rows are 512 weights
        assert len(torch_path.row_blocks(layer_mapping(plan, plan.modules[0]))) == expected_blocks
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(plan.num_slots, generator=gen, dtype=torch.float64, requires_grad=True)
    z_ref = z.detach().clone().requires_grad_(True)
    x = torch.randn(3, rows, 19, generator=gen, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias = torch.randn(37, generator=gen, dtype=torch.float64, requires_grad=True)
    bias_ref = bias.detach().clone().requires_grad_(True)
    s0, s1 = plan.modules
    # Two modules share z: their dz contributions must add up.
    h = RoastLinearFunction.apply(x, z, bias, layer_mapping(plan, s0))
    y = RoastLinearFunction.apply(h, z, None, layer_mapping(plan, s1))
    w0, _, _ = reference_weight(plan, s0, z_ref)
    w1, _, _ = reference_weight(plan, s1, z_ref)
    y_ref = (x_ref @ w0.t() + bias_ref) @ w1.t()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bias.grad, bias_ref.grad, rtol=1e-12, atol=1e-12)
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize("mapper", MAPPERS)
@pytest.mark.parametrize("mode", ["v5", "v1"])
def test_scaler_divides_each_slot_gradient(mapper, mode):
    plan = make_plan(mapper, "tile", [(24, 16), (16, 24)], compression=3.0)
    inv = gradient_scaler(plan, mode)
    unit = plan.scaler_unit()
    z = torch.randn(plan.num_slots, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 16, dtype=torch.float64)
    spec = plan.modules[0]
    y = RoastLinearFunction.apply(x, z, None, layer_mapping(plan, spec, inv.double()))
    g = torch.randn_like(y)
    y.backward(g)
    _, index, scale = reference_weight(plan, spec, z.detach())
    grad_w = g.t() @ x
    expected = torch.zeros(plan.num_slots, dtype=torch.float64)
    expected.index_add_(0, index.flatten(), (grad_w * scale * inv.double()[index // unit]).flatten())
    torch.testing.assert_close(z.grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision_activations_with_fp32_z(dtype, tol):
    """z stays fp32 and is cast to the activation dtype; tolerance = a few ulps of the half format."""
    plan = make_plan("stable", "element", [(33, 40)])
    spec = plan.modules[0]
    z = torch.randn(plan.num_slots, dtype=torch.float32, requires_grad=True)
    x = torch.randn(5, 40, dtype=torch.float32)
    y = RoastLinearFunction.apply(x.to(dtype), z, None, layer_mapping(plan, spec))
    assert y.dtype == dtype
    w, _, _ = reference_weight(plan, spec, z.detach().double())
    y_ref = x.double() @ w.t()
    assert ((y.double() - y_ref).abs() / (y_ref.abs() + 1)).max() < tol * 4
    y.float().sum().backward()
    assert z.grad.dtype == torch.float32 and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("mapper", MAPPERS)
def test_embedding_gathers_only_looked_up_rows(mapper):
    mods = [ModuleSpec("emb", "embedding", 50, 24, 0.7)]
    plan = MappingPlan.build(mods, mapper=mapper, sign="element", seed=1, tile=(8, 8), compression=1.0)
    spec = plan.modules[0]
    z = torch.randn(plan.num_slots, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[3, 49, 3], [0, 17, 8]])
    out = RoastEmbeddingFunction.apply(ids, z, layer_mapping(plan, spec), torch.float64)
    z_ref = z.detach().clone().requires_grad_(True)
    w, index, _ = reference_weight(plan, spec, z_ref)
    torch.testing.assert_close(out, w[ids])
    g = torch.randn_like(out)
    out.backward(g)
    w[ids].backward(g)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-12, atol=1e-12)
    touched = torch.zeros(plan.num_slots, dtype=torch.bool)
    touched[index[ids.flatten()].flatten()] = True
    assert torch.all(z.grad[~touched] == 0) and z.grad[touched].abs().sum() > 0


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
