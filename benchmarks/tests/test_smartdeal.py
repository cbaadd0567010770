"""SmartDeal baseline: the alternating least squares, the code grid, the straight-through training, the byte budgets,
the safetensors round trip, the comparison with round-to-nearest, and the arm."""

from __future__ import annotations

import copy
import json
import math
import struct

import pytest
import torch
from torch import nn

from benchmarks.harness import smartdeal_store
from benchmarks.harness.smartdeal import (
    AUTHORS_LAYOUT,
    DEFAULT_LAYOUT,
    EXPONENTS,
    Layout,
    SmartDealLinear,
    block_view,
    compress_model,
    decompose,
    nonzeros_for_bytes,
    packed_nbytes,
    power_of_two,
    smartdeal_layers,
)
from benchmarks.smartdeal_error import compare, rtn_nbytes, rtn_weight


def structured(out_features=64, in_features=96, layout=DEFAULT_LAYOUT, density=0.4, seed=0) -> torch.Tensor:
    """A weight that is exactly a SmartDeal decomposition of ``layout`` (sparse power-of-two C, dense B)."""
    g = torch.Generator().manual_seed(seed)
    blocks, m, _ = layout.shapes(out_features, in_features)
    exps = torch.randint(0, 4, (blocks, m, layout.rank), generator=g)
    signs = torch.randint(0, 2, exps.shape, generator=g) * 2 - 1
    keep = torch.rand(exps.shape, generator=g) < density
    c = signs * torch.ldexp(torch.ones(exps.shape), -exps) * keep
    b = torch.randn(blocks, layout.rank, layout.chunk, generator=g) * 0.05
    return (c @ b).reshape(out_features, -1)[:, :in_features]


@pytest.mark.parametrize("kind", ["gaussian", "structured"])
def test_als_reduces_the_error_and_beats_trivial_decompositions(kind):
    w = (
        torch.randn(64, 96, generator=torch.Generator().manual_seed(1)) * 0.05
        if kind == "gaussian"
        else structured()
    )
    blocks, m, _ = DEFAULT_LAYOUT.shapes(*w.shape)
    k = int(0.4 * blocks * m * DEFAULT_LAYOUT.rank)
    d = decompose(w, DEFAULT_LAYOUT, k, iterations=8)
    # monotone up to small bumps (the mask and the exponents are re-chosen each step: the structured weight's first
    # re-selection costs 0.03), clearly lower at the end, and the last step is within a hair of the best
    assert all(later <= earlier + 0.05 for earlier, later in zip(d.errors, d.errors[1:]))
    assert d.errors[-1] < d.errors[0] and d.errors[-1] <= min(d.errors) + 0.005
    # C = 0 leaves the whole weight (error 1); one step (B = I, the weight's own top-k powers of two) is worse
    one_step = decompose(w, DEFAULT_LAYOUT, k, iterations=0)
    assert d.relative_error < one_step.relative_error < 1.0
    if kind == "structured":  # a weight with an exact decomposition of this density: far better, and close
        assert d.errors[-1] < 0.9 * d.errors[0] and d.relative_error < 0.25


def test_coefficients_are_signed_powers_of_two_within_the_code_range():
    w = torch.randn(64, 96) * 0.05
    d = decompose(w, DEFAULT_LAYOUT, 5000, iterations=4)
    nz = d.cq[d.cq != 0].abs()
    assert nz.numel() == int(d.mask.sum()) <= 5000
    e = -torch.log2(nz)
    assert torch.equal(e, e.round()) and e.min() >= 0 and e.max() <= EXPONENTS - 1
    # out-of-range values clamp onto the 16 exponents; zero stays zero; rounding is to the nearest power in value
    x = torch.tensor([5.0, -1.0, 0.7, 0.74, 0.76, 2.0**-20, 0.0, -0.3])
    assert power_of_two(x).tolist() == [1.0, -1.0, 0.5, 0.5, 1.0, 2.0**-15, 0.0, -0.25]


def test_straight_through_estimator_passes_gradients_to_both_shadows():
    torch.manual_seed(0)
    dense = nn.Linear(40, 16)
    layer = SmartDealLinear.from_linear(dense, DEFAULT_LAYOUT, budget=40 * 16 * 4 // 4, iterations=2)
    x = torch.randn(8, 40)
    layer(x).pow(2).sum().backward()
    # the gradient is the one of the quantised C (masked) and of B's grid values, passed straight through
    cq, bq = (t.detach().requires_grad_() for t in layer.quantised())
    w = torch.bmm(cq, bq).reshape(16, -1)[:, :40]
    nn.functional.linear(x, w, layer.bias.detach()).pow(2).sum().backward()
    assert torch.allclose(layer.coefficients.grad, cq.grad * layer.mask)
    assert torch.allclose(layer.basis.grad, bq.grad)
    assert layer.coefficients.grad[layer.mask].abs().sum() > 0 and layer.basis.grad.abs().sum() > 0
    assert not layer.coefficients.grad[~layer.mask].any()


@pytest.mark.parametrize("layout", [DEFAULT_LAYOUT, AUTHORS_LAYOUT])
@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (384, 1536)])
@pytest.mark.parametrize("ratio", [8, 16])
def test_byte_targets_are_met_on_minilm_shapes(layout, shape, ratio):
    budget = math.floor(4 * shape[0] * shape[1] / ratio)
    k = nonzeros_for_bytes(*shape, layout, budget)
    stored = packed_nbytes(*shape, layout, k)
    assert budget - 1 <= stored <= budget  # one more code would not fit
    assert (
        packed_nbytes(*shape, layout, k + 1) > budget
        or k == math.prod(layout.shapes(*shape)[:2]) * layout.rank
    )
    assert ratio <= 4 * shape[0] * shape[1] / stored < ratio * 1.001


def test_layer_bytes_and_ratio_on_a_minilm_matrix():
    dense = nn.Linear(384, 1536)
    layer = SmartDealLinear.from_linear(dense, DEFAULT_LAYOUT, budget=384 * 1536 * 4 // 16, iterations=1)
    tensors = smartdeal_store.export(layer)
    assert smartdeal_store.tensor_nbytes(tensors) == layer.stored_nbytes() <= 384 * 1536 * 4 // 16


def _trained_model(steps: int = 3) -> nn.Module:
    """Two SmartDeal layers (one with padded input: 30 is not a multiple of the chunk), trained a few steps so the
    shadows are off their grids."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 24), nn.ReLU(), nn.Linear(24, 16))
    targets = [(n, m, "linear") for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    compress_model(model, targets, bytes_ratio=6.0, iterations=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(32, 30)).pow(2).mean().backward()
        opt.step()
    return model


def test_safetensors_round_trip_is_exact_and_its_bytes_are_the_reported_bytes(tmp_path):
    model = _trained_model()
    x = torch.randn(5, 30)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "smartdeal.safetensors"
    saved = smartdeal_store.save(model, path)
    reported = sum(layer.stored_nbytes() for _, layer in smartdeal_layers(model))
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])
    assert saved == reported == len(raw) - 8 - header_len
    assert {k.rsplit(".", 1)[1] for k in header if k != "__metadata__"} == {
        "mask",
        "codes",
        "basis",
        "basis_scales",
    }
    assert {header[k]["dtype"] for k in header if k.endswith(".codes") or k.endswith(".mask")} == {"U8"}
    assert {header[k]["dtype"] for k in header if k.endswith(".basis")} == {"I8"}
    loaded = smartdeal_store.load(copy.deepcopy(model), path)
    assert all(type(m).__name__ == "DecodedSmartDealLinear" for _, m in smartdeal_layers(loaded))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    smartdeal_store.decode_in_place(model)  # what the arm scores: the stored form, in memory
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_bit_packing_round_trips_any_width():
    values = torch.randint(0, 32, (1001,))
    packed = smartdeal_store.pack_bits(values, 5)
    assert packed.numel() == math.ceil(1001 * 5 / 8)
    assert torch.equal(smartdeal_store.unpack_bits(packed, 1001, 5, signed=False), values)


def test_rtn_reference_is_the_arms_grid_and_the_comparison_reports_equal_bytes():
    from hf_roast.quant import fake_quantize_groups

    w = torch.randn(32, 64) * 0.05
    assert torch.allclose(rtn_weight(w, 4).float(), fake_quantize_groups(w.reshape(-1), 4, 128).view_as(w))
    weights = {f"encoder.layer.{i}.attention.self.query.weight": torch.randn(64, 64) * 0.05 for i in range(2)}
    weights["encoder.layer.0.intermediate.dense.weight"] = torch.randn(128, 64) * 0.05
    rows = {(r["projection"], r["method"]): r for r in compare(weights, rtn_bits=(4, 3), iterations=2)}
    assert {p for p, _ in rows} == {"attention.self.query", "intermediate.dense", "all"}
    for bits in (4, 3):
        rtn, sd = rows["all", f"rtn int{bits}"], rows["all", f"smartdeal @ rtn int{bits}"]
        assert rtn["bytes_ratio"] == pytest.approx(
            4 * 16384 / (rtn_nbytes(4096, bits) * 2 + rtn_nbytes(8192, bits))
        )
        assert sd["bytes_ratio"] >= rtn["bytes_ratio"]  # SmartDeal fits in RTN's bytes
        assert 0 < rtn["relative_error"] < 1 and 0 < sd["relative_error"] < 1
    assert rows["all", "smartdeal 16x"]["relative_error"] > rows["all", "smartdeal 8x"]["relative_error"]
    assert rows["all", "smartdeal 8x"]["bytes_ratio"] == pytest.approx(8.0, rel=1e-3)


def test_smartdeal_arm_replaces_the_targets_within_its_bytes():
    from transformers import BertConfig, BertForSequenceClassification

    from benchmarks.harness.arms import Arm, build_arm_model, finish_training

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    arm = Arm("smartdeal-8xbytes", "smartdeal", 8.0)
    model, storage = build_arm_model(BertForSequenceClassification(config), arm)
    layers = smartdeal_layers(model)
    assert len(layers) == 2 * 6 + 1  # six projections per layer and the pooler; the classifier stays dense
    assert isinstance(model.classifier, nn.Linear)
    assert storage["target_bytes_ratio"] >= 8.0 and storage["target_bytes"] == sum(
        m.stored_nbytes() for _, m in layers
    )
    assert 0 < storage["init_relative_error"] < 1
    model.eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        finish_training(model, arm)  # scored as stored
        assert torch.equal(model(input_ids=ids).logits, before)
    with pytest.raises(ValueError, match="bytes ratio"):
        Arm("x", "smartdeal", 1.0)


def test_layout_rejects_what_it_cannot_cut():
    with pytest.raises(ValueError, match="rank <= chunk"):
        Layout(chunk=2, rank=3)
    with pytest.raises(ValueError, match="rows_per_basis"):
        Layout(rows_per_basis=5).shapes(64, 64)
    with pytest.raises(ValueError, match="cannot hold"):
        nonzeros_for_bytes(64, 64, AUTHORS_LAYOUT, 64 * 64 * 4 // 64)
    assert block_view(torch.ones(8, 6), Layout(4, 4, 8)).shape == (1, 16, 4)


def test_the_sweeps_list_smartdeal_at_both_byte_budgets_on_its_own_grid():
    from benchmarks.harness.experiments import SMARTDEAL_LRS, classification_arms

    tiny = {a.name: a for _, a in classification_arms("tiny")}
    full = {a.name: a for _, a in classification_arms("full")}
    assert tiny["smartdeal-8xbytes"].method == "smartdeal"
    for ratio in (8, 16):
        arm = full[f"smartdeal-{ratio}xbytes"]
        assert (arm.method, arm.compression, arm.lrs) == ("smartdeal", float(ratio), SMARTDEAL_LRS)


def test_straight_through_training_moves_the_stored_weight_towards_a_target():
    """The init is least-squares optimal for B given C, so the target is the stored weight scaled by 1.3 (plus the
    teacher's bias): reachable through B alone, on its int8 grid, if the gradients pass the quantisers."""
    torch.manual_seed(0)
    teacher = nn.Linear(64, 32)
    layer = SmartDealLinear.from_linear(teacher, DEFAULT_LAYOUT, budget=64 * 32 * 4 // 16, iterations=3)
    x = torch.randn(256, 64)
    with torch.no_grad():
        target = nn.functional.linear(x, 1.3 * layer.materialize_weight(), teacher.bias)

    def loss() -> torch.Tensor:
        return (layer(x) - target).pow(2).mean()

    before = loss().item()
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():  # the quantised forward (what is stored) fits far better, and is still on its grid
        assert loss().item() < 0.2 * before
        cq, _ = layer.quantised()
        e = -torch.log2(cq[cq != 0].abs())
        assert torch.equal(e, e.round()) and int((cq != 0).sum()) <= int(layer.mask.sum())
