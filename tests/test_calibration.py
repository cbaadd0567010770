"""Activation-aware initialisation: statistics, the weighted projections, and the output-error solve.

The solve is checked against an independent reference: the mapping written out as an explicit matrix
(z -> every compressed weight, built by materialising unit vectors) and the weighted normal equations
solved densely with torch.linalg.
"""

import copy

import pytest
import torch
from helpers import VOCAB, tiny_bert_classifier, tiny_llama

from hf_roast import RoastConfig, get_roast_model
from hf_roast.backends.pytorch import materialize_weight
from hf_roast.calibration import column_weights, input_statistics, normalized_gram
from hf_roast.compress import dense_weight
from hf_roast.targets import find_targets


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (4, 16), generator=g)} for _ in range(n)]


def test_statistics_match_activations_captured_by_hand():
    model = tiny_llama()
    config = RoastConfig(compression=4)
    targets = find_targets(model, config)
    captured = {}
    name, module, _ = targets[3]
    handle = module.register_forward_hook(lambda m, a, o: captured.setdefault("x", []).append(a[0].detach()))
    batches = _batches()
    grams = input_statistics(model, targets, batches, full=True)
    handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured["x"][: len(batches)]]).double()
    torch.testing.assert_close(grams[name].double(), x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    diag = input_statistics(model, targets, [b["input_ids"] for b in batches])
    torch.testing.assert_close(diag[name].double(), (x**2).mean(0), rtol=1e-4, atol=1e-6)
    assert set(grams) == {n for n, _, k in targets if k in ("linear", "conv1d")}


def test_padded_positions_do_not_count():
    """A padded batch gives the statistics of its sequences fed one by one without padding; only inputs laid
    out per token are masked (the pooler reads the first token of every sequence and counts whole)."""
    model = tiny_bert_classifier()
    targets = find_targets(model, RoastConfig(compression=4))
    g = torch.Generator().manual_seed(1)
    lengths = (5, 11, 16)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    padded = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
        mask[i, : len(s)] = 1
    one_by_one = [
        {"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)} for s in seqs
    ]
    want = input_statistics(model, targets, one_by_one, full=True)
    got = input_statistics(model, targets, [{"input_ids": padded, "attention_mask": mask}], full=True)
    pooler = [n for n, _, _ in targets if "pooler" in n]
    assert pooler and set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    # the padded positions do change the statistics when they are not masked (so the check above can fail)
    unmasked = input_statistics(model, targets, [{"input_ids": padded}], full=True)
    assert not torch.allclose(
        unmasked["bert.encoder.layer.0.attention.self.query"],
        want["bert.encoder.layer.0.attention.self.query"],
        rtol=1e-3,
    )
    with pytest.raises(ValueError, match="padding"):
        input_statistics(model, targets, [{"input_ids": padded, "attention_mask": torch.zeros_like(mask)}])


def test_column_weights_and_gram_are_normalised():
    w = column_weights(torch.tensor([0.0, 1.0, 3.0]))
    assert w.mean().item() == pytest.approx(1.0, rel=1e-5) and w.min() > 0
    assert torch.equal(column_weights(torch.zeros(4)), torch.ones(4))
    g = normalized_gram(torch.diag(torch.tensor([2.0, 6.0])), damping=0.5)
    torch.testing.assert_close(g, torch.diag(torch.tensor([1.0, 2.0])))


def _small_llama():
    return tiny_llama(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )


def _mapping_matrix(model):
    """The linear map z -> (every compressed weight), as an explicit dense matrix per module."""
    store = model.roast_store
    n = store.plan.num_slots
    eye = torch.eye(n)
    mats = {}
    for name, layer in model.roast_layers():
        layer_map = layer.layer_mapping()
        cols = [
            materialize_weight(eye[i], layer_map, torch.float32, scratch=False).flatten() for i in range(n)
        ]
        mats[name] = torch.stack(cols, 1).double()
    return mats


@pytest.mark.parametrize("calibration", ["diagonal", "output"])
def test_calibrated_projection_solves_its_weighted_least_squares(calibration):
    """Reference: the normal equations of sum_l ||(W_l(z) - W_l) S_l||^2 solved densely in float64."""
    dense = _small_llama()
    config = RoastConfig(compression=6, tile=(4, 4), target_modules=["q_proj", "o_proj", "down_proj"])
    batches = _batches()
    targets = find_targets(dense, config)
    stats = input_statistics(dense, targets, batches, full=True)
    weights = {n: dense_weight(m, k).detach().double() for n, m, k in targets}
    model = get_roast_model(copy.deepcopy(dense), config, calibration_data=batches, calibration=calibration)
    mats = _mapping_matrix(model)
    n = model.roast_store.plan.num_slots
    lhs = torch.zeros(n, n, dtype=torch.float64)
    rhs = torch.zeros(n, dtype=torch.float64)
    for name, a in mats.items():
        rows, cols = weights[name].shape
        if calibration == "diagonal":
            g = torch.diag(column_weights(stats[name].diagonal()).double())
        else:
            g = normalized_gram(stats[name], 0.01).double()
        # tr(E G E^T) = sum over rows r of e_r^T G e_r, with e_r = A_r z - w_r (A_r: the rows' block of A)
        a_rows = a.view(rows, cols, n)
        lhs += torch.einsum("rci,cd,rdj->ij", a_rows, g, a_rows)
        rhs += torch.einsum("rci,cd,rd->i", a_rows, g, weights[name])
    expected = torch.linalg.lstsq(lhs, rhs).solution
    z = model.roast_store.z.detach().double()
    if calibration == "diagonal":
        torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-6)
    else:
        # conjugate gradients, stopped at 50 iterations: the objective is within 1% of the optimum and far
        # below plain least squares'
        def objective(v):
            return float(v @ lhs @ v - 2 * rhs @ v)

        plain = get_roast_model(copy.deepcopy(dense), config).roast_store.z.detach().double()
        best, got, start = objective(expected), objective(z), objective(plain)
        assert got - best <= 0.01 * (start - best)
        report = model.roast_store.calibration_report
        assert report["output_error_after"] < report["output_error_before"]


def test_output_calibration_keeps_the_dense_function_better_than_plain_least_squares():
    dense = tiny_bert_classifier()
    batches = [
        {"input_ids": b["input_ids"], "attention_mask": torch.ones(4, 16, dtype=torch.long)}
        for b in _batches()
    ]
    held_out = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(7))
    config = RoastConfig(compression=4, exclude_modules=["classifier"])
    with torch.no_grad():
        ref = dense(input_ids=held_out, output_hidden_states=True).hidden_states[-1]
        errors = {}
        for mode in (None, "output"):
            kw = {"calibration_data": batches, "calibration": mode} if mode else {}
            model = get_roast_model(copy.deepcopy(dense), config, **kw).eval()
            out = model(input_ids=held_out, output_hidden_states=True).hidden_states[-1]
            errors[mode] = float((out - ref).norm() / ref.norm())
    assert errors["output"] < 0.8 * errors[None]


def test_bad_calibration_arguments_are_refused():
    with pytest.raises(ValueError, match="Unknown calibration"):
        get_roast_model(
            tiny_llama(), RoastConfig(compression=4), calibration_data=_batches(), calibration="full"
        )
    with pytest.raises(ValueError, match="init='pretrained'"):
        get_roast_model(tiny_llama(), RoastConfig(compression=4, init="random"), calibration_data=_batches())
    with pytest.raises(ValueError, match="yielded no batch"):
        get_roast_model(tiny_llama(), RoastConfig(compression=4), calibration_data=[])
    with pytest.raises(TypeError, match="dicts of tensors"):
        get_roast_model(tiny_llama(), RoastConfig(compression=4), calibration_data=[[1, 2, 3]])
