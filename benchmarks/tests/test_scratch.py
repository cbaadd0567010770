"""The from-scratch experiment's pieces: byte data, equal budgets, shared batches and the metric."""

import json
import math

import pytest
import torch

from benchmarks.harness.arms import Arm
from benchmarks.harness.scratch import (
    EOS,
    ScratchSetup,
    bits_per_byte,
    build_scratch_model,
    bytes_of,
    narrower_shape,
    projection_values,
    projection_weights,
    run_scratch_arm,
    split_bytes,
    split_rate_groups,
    tiny_bytes_source,
    training_windows,
    up_to_date,
)

TINY = ScratchSetup(
    hidden_size=64, intermediate_size=160, num_layers=2, head_dim=16, context=16, batch_size=4
)


def test_bytes_round_trip_with_an_end_token_per_article():
    stream = bytes_of(["ab", "é"])
    assert stream.tolist() == [97, 98, EOS, 0xC3, 0xA9, EOS]
    train, val, test = split_bytes(["a", "b", "c", "d"], ["z"], val_every=2)
    assert val.tolist() == [97, EOS, 99, EOS] and train.tolist() == [98, EOS, 100, EOS]
    assert test.tolist() == [122, EOS]


@pytest.mark.parametrize("c", [4, 8, 16, 32])
def test_narrower_model_stores_the_budget_in_whole_heads(c):
    setup = ScratchSetup()
    dense = projection_values(setup.hidden_size, setup.intermediate_size, setup.num_layers)
    budget = dense // c
    hidden, intermediate, _ = narrower_shape(setup, budget)
    assert hidden % setup.head_dim == 0 and intermediate >= 1
    # the MLP width absorbs the rounding of the width to whole heads: within one MLP column of the budget
    assert (
        abs(projection_values(hidden, intermediate, setup.num_layers) - budget)
        <= 3 * hidden * setup.num_layers
    )


@pytest.mark.parametrize("method", ["roast", "prune", "narrower"])
def test_compressed_arms_store_the_same_values(method):
    _, roast = build_scratch_model(Arm("r", "roast", 8.0), TINY)
    model, storage = build_scratch_model(Arm("x", method, 8.0), TINY)
    assert storage["dense_target_values"] == projection_values(64, 160, 2)
    assert storage["target_values"] == pytest.approx(roast["target_values"], rel=0.1)
    if method == "prune":
        assert storage["target_values"] == roast["target_values"]
        assert storage["target_bytes"] > 4 * storage["target_values"], "the sparsity pattern is paid for"
    json.dumps(storage)  # results are written as JSON
    assert model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 257)


@pytest.mark.parametrize("method", ["dense", "roast", "prune", "narrower"])
def test_split_rates_put_exactly_the_projections_in_their_group(method):
    """The split-rate protocol: the projection weights (z for hf-roast) at the scanned rate, the rest fixed."""
    from hf_roast.checkpoint_format import STORE_NAME
    from hf_roast.optim import z_weight_multiplier

    model, storage = build_scratch_model(Arm("x", method, 8.0), TINY)
    projections, rest = split_rate_groups(model, 1e-3, 1e-2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(projections["params"]) + len(rest["params"]) == len(trainable)
    assert {id(p) for p in projections["params"]}.isdisjoint(id(p) for p in rest["params"])
    stored = sum(p.numel() for p in projections["params"])
    if method == "roast":
        assert projections["params"] == [getattr(model, STORE_NAME).z]
        assert projections["lr"] == pytest.approx(1e-3 * z_weight_multiplier(model))
    else:
        assert len(projections["params"]) == 7 * TINY.num_layers  # q k v o gate up down per layer
        assert projections["lr"] == 1e-3
        # pruning keeps its dense weight_orig trainable (masked); the others store exactly their projections
        assert stored == (storage["dense_target_values"] if method == "prune" else storage["target_values"])
    assert rest["lr"] == 1e-2
    assert any(p is model.lm_head.weight for p in rest["params"])
    assert all(p is not model.lm_head.weight for p in projection_weights(model))


def test_every_arm_sees_the_same_batches_in_the_same_order():
    stream = torch.arange(1000) % 256
    a, b = training_windows(stream, TINY), training_windows(stream, TINY)
    assert all(torch.equal(a(i), b(i)) for i in range(5))
    assert not torch.equal(a(0), a(1))
    assert a(0).shape == (TINY.batch_size, TINY.context + 1)
    with pytest.raises(ValueError, match="fewer than one window"):
        training_windows(torch.arange(10), TINY)


def test_bits_per_byte_of_a_uniform_model_is_eight_point_something():
    class Uniform(torch.nn.Module):
        training = False

        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 257)})()

    stream = torch.arange(200) % 256
    assert bits_per_byte(Uniform(), stream, context=16, max_bytes=160) == pytest.approx(math.log2(257))


def test_a_wider_grid_trains_only_the_new_rates(monkeypatch):
    """Resuming a sweep with a wider grid keeps earlier runs (same arm, same setup) and trains the rest."""
    import benchmarks.harness.scratch as scratch

    setup = ScratchSetup(
        hidden_size=32, intermediate_size=64, num_layers=1, head_dim=16, context=16, batch_size=2,
        steps=3, val_bytes=128, eval_bytes=128,
    )  # fmt: skip
    source = tiny_bytes_source()
    first, _ = run_scratch_arm(Arm("r", "roast", 4.0, lrs=(1e-3,)), source, setup)
    wider = Arm("r", "roast", 4.0, lrs=(1e-3, 3e-3))
    assert up_to_date(first, Arm("r", "roast", 4.0, lrs=(1e-3,)), setup)
    assert not up_to_date(first, wider, setup)
    trained = []
    real = scratch.train_from_scratch
    monkeypatch.setattr(
        scratch,
        "train_from_scratch",
        lambda m, s, lr, *a, **kw: trained.append(lr) or real(m, s, lr, *a, **kw),
    )
    second, _ = run_scratch_arm(wider, source, setup, previous=json.loads(json.dumps(first)))
    assert trained == [3e-3]
    assert second["lr_search"][0] == first["lr_search"][0]
    best = min(second["lr_search"], key=lambda r: r["val_bits_per_byte"])
    assert second["selected_lr"] == best["lr"] and second["bits_per_byte"] == best["test_bits_per_byte"]
    # a different arm (here another scaler) or another budget never reuses runs
    assert not up_to_date(first, Arm("r", "roast", 4.0, lrs=(1e-3,), scaler="none"), setup)
    assert not up_to_date(first, Arm("r", "roast", 4.0, lrs=(1e-3,)), ScratchSetup(steps=4))
