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


@pytest.mark.parametrize("c", [256, 1024])
def test_narrower_model_below_one_head_keeps_one_narrow_head_within_the_budget(c):
    setup = ScratchSetup()
    budget = projection_values(setup.hidden_size, setup.intermediate_size, setup.num_layers) // c
    hidden, intermediate, head_dim = narrower_shape(setup, budget)
    assert head_dim < setup.head_dim and hidden == head_dim and head_dim % 2 == 0
    assert (
        abs(projection_values(hidden, intermediate, setup.num_layers) - budget)
        <= 3 * hidden * setup.num_layers
    )
    model, storage = build_scratch_model(Arm("n", "narrower", float(c), tile=(8, 8)), setup)
    assert model.config.num_attention_heads == 1 and model.config.head_dim == head_dim
    ids = torch.randint(0, 256, (1, 8))
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_the_floor_has_no_projection_weights_to_learn():
    model, storage = build_scratch_model(Arm("f", "floor", rest_lr=1e-2), TINY)
    weights = projection_weights(model)
    assert weights and all(not w.requires_grad and not w.any() for w in weights)
    assert storage["target_values"] == 0 and storage["target_bytes"] == 0
    groups = split_rate_groups(model, 1e-3, 1e-2)
    assert groups[0]["params"] == []  # nothing to train among the projections
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert storage["training_memory"]["parameter_bytes"] == 4 * trainable


def test_random_pruning_keeps_the_same_count_as_magnitude_pruning_but_other_weights():
    _, magnitude = build_scratch_model(Arm("m", "prune", 8.0), TINY)
    model_m, _ = build_scratch_model(Arm("m", "prune", 8.0), TINY)
    model_r, random_ = build_scratch_model(Arm("r", "prune", 8.0, prune_by="random"), TINY)
    assert random_["target_values"] == magnitude["target_values"]
    masks_m = [b for n, b in model_m.named_buffers() if n.endswith("weight_mask")]
    masks_r = [b for n, b in model_r.named_buffers() if n.endswith("weight_mask")]
    assert [int(m.sum()) for m in masks_m] == [int(m.sum()) for m in masks_r]
    assert any(not torch.equal(a, b) for a, b in zip(masks_m, masks_r))
    with pytest.raises(ValueError, match="prune_by"):
        Arm("x", "roast", 8.0, prune_by="random")


def test_training_memory_counts_what_each_method_trains():
    _, dense = build_scratch_model(Arm("d", "dense"), TINY)
    _, roast = build_scratch_model(Arm("r", "roast", 8.0), TINY)
    _, pruned = build_scratch_model(Arm("p", "prune", 8.0), TINY)
    saved = dense["training_memory"]["total_bytes"] - roast["training_memory"]["total_bytes"]
    # sharing trains z instead of the projections: parameters, gradients and both AdamW moments shrink
    assert saved == 16 * (roast["dense_target_values"] - roast["target_values"])
    # pruning at init here trains dense-sized weights under a dense mask; sparse kernels would not
    assert pruned["training_memory"]["total_bytes"] > dense["training_memory"]["total_bytes"]
    assert (
        pruned["training_memory"]["with_sparse_kernels_bytes"] < roast["training_memory"]["total_bytes"] * 2
    )


def test_the_high_compression_sweep_runs_resumes_and_reports(tmp_path):
    from benchmarks.evaluate import main
    from benchmarks.harness import scratch_high

    assert main(["--tiny", "--experiments", "scratch-high", "--output", str(tmp_path), "--threads", "1"]) == 0
    folder = tmp_path / "scratch_high"
    long_arm = json.loads(next(folder.glob("roast-*-16steps.json")).read_text())
    grid = json.loads(next(folder.glob("roast-*-8steps.json")).read_text())
    best_two = sorted(grid["lr_search"], key=lambda r: r["val_bits_per_byte"])[:2]
    assert sorted(r["lr"] for r in long_arm["lr_search"]) == sorted(r["lr"] for r in best_two)
    assert long_arm["arm"]["lrs"][0] == best_two[0]["lr"]  # the likeliest rate first (breadth-first sweeps)
    assert all(r["val_curve"] for r in long_arm["lr_search"])  # the curve every 4 steps
    summary = json.loads((tmp_path / "scratch_high.json").read_text())
    assert {v["steps"] for v in summary["verdicts"]} == {8, 16} and summary["plots"]
    assert all(v["complete"] for v in summary["verdicts"])
    assert "| 16 | 64x | hf-roast" in (tmp_path / "scratch_high.md").read_text()
    assert all(v["every_rate_trained"] for v in summary["verdicts"])
    # an arm saved between two learning rates counts with the rate it has, flagged in the table and verdict
    partial = dict(long_arm, complete=False, lr_search=long_arm["lr_search"][:1])
    partial["bits_per_byte"] = partial["lr_search"][0]["test_bits_per_byte"]
    (folder / f"{long_arm['arm']['name']}.json").write_text(json.dumps(partial))
    rows = scratch_high.load(tmp_path)
    assert len(rows) == len(summary["arms"])
    flagged = [r for r in rows if r["rates_trained"] < r["rates_planned"]]
    assert [(r["name"], r["rates_trained"], r["rates_planned"]) for r in flagged] == [
        (long_arm["arm"]["name"], 1, 2)
    ]
    assert "(1 of 2 rates)" in scratch_high.table(rows)
    assert [v["every_rate_trained"] for v in scratch_high.verdicts(rows) if v["steps"] == 16] == [False]


def test_a_breadth_first_sweep_trains_one_rate_per_arm_per_pass(tmp_path, monkeypatch):
    import benchmarks.harness.scratch as scratch
    from benchmarks.evaluate import main

    trained = []
    real = scratch._train_one_rate
    monkeypatch.setattr(
        scratch, "_train_one_rate", lambda arm, *a: trained.append((arm.name, a[2])) or real(arm, *a)
    )
    arms = ["prune-magnitude-64x-8steps", "narrower-64x-8steps"]
    command = ["--tiny", "--experiments", "scratch-high", "--output", str(tmp_path), "--rates-per-pass", "1"]
    assert main([*command, "--arms", *arms]) == 0
    # pass one: the first rate of each grid; pass two: the second
    assert [name for name, _ in trained] == [arms[0], arms[1], arms[0], arms[1]]
    for name in arms:
        result = json.loads((tmp_path / "scratch_high" / f"{name}.json").read_text())
        assert "complete" not in result and len(result["lr_search"]) == 2


def test_an_arm_saved_between_two_rates_resumes_where_it_stopped(tmp_path, monkeypatch):
    import benchmarks.harness.scratch as scratch
    from benchmarks.evaluate import main

    command = ["--tiny", "--experiments", "scratch-high", "--output", str(tmp_path), "--threads", "1"]
    assert main([*command, "--arms", "narrower-64x-8steps"]) == 0
    path = tmp_path / "scratch_high" / "narrower-64x-8steps.json"
    result = json.loads(path.read_text())
    dropped = result["lr_search"].pop()
    path.write_text(json.dumps({**result, "complete": False}))  # as if stopped after the first rate
    trained = []
    real = scratch._train_one_rate
    monkeypatch.setattr(scratch, "_train_one_rate", lambda arm, *a: trained.append(a[2]) or real(arm, *a))
    assert main([*command, "--arms", "narrower-64x-8steps"]) == 0
    assert trained == [dropped["lr"]]
    resumed = json.loads(path.read_text())
    assert "complete" not in resumed and [r["lr"] for r in resumed["lr_search"]] == [
        r["lr"] for r in result["lr_search"]
    ] + [dropped["lr"]]
