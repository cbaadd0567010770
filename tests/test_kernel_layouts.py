"""The kernels' index layouts against the PyTorch path, under the interpreter.

The kernels read per-tile values (slot, scale, scaler) and packed z's group scales once per cell of the tile
or group grid when the tile and group are powers of two, and once per weight otherwise; they do the index
arithmetic in int32 below 2**31 values and in int64 from there up. Every combination must give the PyTorch
path's results: these tests cover the layouts that tests/test_kernels.py (8x16 tiles, small z) does not reach.
"""

import pytest
import torch

triton = pytest.importorskip("triton")
from helpers import assert_close_scaled  # noqa: E402

from hf_roast.backends.pytorch import RoastEmbeddingFunction, RoastLinearFunction  # noqa: E402
from hf_roast.backends.triton import ops  # noqa: E402  (after TRITON_INTERPRET)
from hf_roast.backends.triton import roast_matmul as rm  # noqa: E402
from hf_roast.backends.triton.roast_matmul import Blocks, forced_blocks  # noqa: E402
from hf_roast.mapping import LayerMapping, MappingPlan, ModuleSpec, gradient_scaler  # noqa: E402
from hf_roast.quant import QuantizedZ  # noqa: E402

pytestmark = pytest.mark.skipif(not rm.INTERPRETED, reason="layout tests run the interpreter (CPU tensors)")


def make(tile, mapper="stable", sign="element", shape=(37, 45)):
    specs = [ModuleSpec("q", "linear", *shape, 0.75), ModuleSpec("emb", "embedding", 13, 19, 0.5)]
    plan = MappingPlan.build(specs, mapper=mapper, sign=sign, seed=5, tile=tile, compression=2.0)
    inv = gradient_scaler(plan, "v5")

    def lm(name):
        spec = plan.spec(name)
        return LayerMapping(
            plan, spec, plan.tile_slots(spec) if plan.is_tiled else None, plan.tile_scales(spec), inv
        )

    return plan, lm


def linear_results(fn, x, z, bias, lm, grad_y):
    x, bias = x.detach().requires_grad_(), bias.detach().requires_grad_()
    leaves = [x, bias]
    if isinstance(z, torch.Tensor):  # a packed z is no parameter
        z = z.detach().requires_grad_()
        leaves.append(z)
    y = fn(x, z, bias, lm)
    return (y.detach(), *torch.autograd.grad(y, leaves, grad_y))


def check_linear(plan, lm, blocks, z=None):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(plan.num_slots, generator=g) if z is None else z
    rows, cols = lm.spec.rows, lm.spec.cols
    x, bias = torch.randn(3, cols, generator=g), torch.randn(rows, generator=g)
    grad_y = torch.randn(3, rows, generator=g)
    with forced_blocks(blocks):
        got = linear_results(ops.triton_roast_linear, x, z, bias, lm, grad_y)
    want = linear_results(RoastLinearFunction.apply, x, z, bias, lm, grad_y)
    for name, a, b in zip(("y", "dx", "db", "dz"), got, want):
        assert_close_scaled(a, b, torch.float32, name)


@pytest.mark.parametrize("tile", [(6, 10), (5, 16), (8, 12)], ids=str)
@pytest.mark.parametrize("mapper", ["stable", "roast"])
def test_tiles_that_are_not_powers_of_two_read_per_weight(tile, mapper):
    plan, lm = make(tile, mapper)
    geo = rm.Geometry.of(plan, plan.spec("q"))
    assert not rm._layout_args(geo, None, plan.num_slots)["TILE_GRID"]
    check_linear(plan, lm("q"), Blocks(16, 16, 16))


@pytest.mark.parametrize(
    "tile, blocks",
    [((32, 32), Blocks(16, 16, 16)), ((16, 32), Blocks(32, 64, 16)), ((1, 16), Blocks(16, 16, 32))],
    ids=["tile>block", "mixed", "one-row-tiles"],
)
def test_tile_grid_when_tiles_and_blocks_nest_either_way(tile, blocks):
    plan, lm = make(tile, shape=(61, 77))
    assert rm._layout_args(rm.Geometry.of(plan, plan.spec("q")), None, plan.num_slots)["TILE_GRID"]
    check_linear(plan, lm("q"), blocks)


@pytest.mark.parametrize("mapper", ["stable", "hashednet"])
def test_int64_index_arithmetic_equals_int32(monkeypatch, mapper):
    """Past 2**31 values the kernels index in int64: forced here on a small plan, the same results."""
    monkeypatch.setattr(rm, "WIDE_LIMIT", 1)
    plan, lm = make((8, 16), mapper)
    assert rm._layout_args(rm.Geometry.of(plan, plan.spec("q")), None, plan.num_slots)["WIDE"]
    check_linear(plan, lm("q"), Blocks(16, 16, 16))
    ids = torch.tensor([[0, 12, 5], [12, 1, 8]])
    z = torch.randn(plan.num_slots, generator=torch.Generator().manual_seed(2))
    assert torch.equal(
        ops.triton_roast_embedding(ids, z, lm("emb"), torch.float32),
        RoastEmbeddingFunction.apply(ids, z, lm("emb"), torch.float32),
    )


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [4, 16, 64], ids=lambda g: f"group{g}")
def test_packed_group_scales_on_the_group_grid(bits, group):
    """Groups shorter than a tile row (4), one row (16) and several rows (64) of a 8x16 tile."""
    plan, lm = make((8, 16))
    z = torch.randn(plan.num_slots, generator=torch.Generator().manual_seed(bits))
    q = QuantizedZ.quantize(z, bits, group, plan.tile_numel)
    g = torch.Generator().manual_seed(3)
    x, bias = torch.randn(5, 45, generator=g), torch.randn(37, generator=g)
    grad_y = torch.randn(5, 37, generator=g)
    for blocks in (Blocks(16, 16, 16), Blocks(16, 64, 32)):
        with forced_blocks(blocks):
            got = linear_results(ops.triton_roast_linear, x, q, bias, lm("q"), grad_y)
            ref = linear_results(ops.triton_roast_linear, x, q.dequantize(), bias, lm("q"), grad_y)
        want = linear_results(RoastLinearFunction.apply, x, q, bias, lm("q"), grad_y)
        for name, a, b, r in zip(("y", "dx", "db"), got, want, ref):
            assert_close_scaled(a, b, torch.float32, name)
            assert torch.equal(a, r), name
    ids = torch.tensor([[0, 12, 5, 5], [12, 1, 8, 0]])
    assert torch.equal(
        ops.triton_roast_embedding(ids, q, lm("emb"), torch.float32),
        RoastEmbeddingFunction.apply(ids, q, lm("emb"), torch.float32),
    )
