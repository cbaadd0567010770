"""The PyTorch backend (hf_roast/backends/pytorch.py) against a dense reference built element by element
from the mapping: forward and every gradient, in blocks of tile rows, with the gradient scaler, in half
precision, and the embedding's gather and scatter."""

import pytest
import torch

from hf_roast.backends import pytorch
from hf_roast.backends.pytorch import RoastEmbeddingFunction, RoastLinearFunction
from hf_roast.mapping import MAPPERS, SIGNS, LayerMapping, MappingPlan, ModuleSpec, gradient_scaler


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
        monkeypatch.setattr(pytorch, "ROW_BLOCK_WEIGHTS", row_block)
    shapes = [(37, 19), (5, 37)]  # neither dim a multiple of the 8x16 tile; a 5-row layer is all edge
    plan = make_plan(mapper, sign, shapes)
    if row_block is not None and plan.is_tiled:
        expected_blocks = {1: 5, 600: 3}[row_block]  # 37 rows = 5 tile rows of 8; 2 tile rows are 512 weights
        assert len(pytorch.row_blocks(layer_mapping(plan, plan.modules[0]))) == expected_blocks
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
