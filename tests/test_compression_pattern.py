"""RoastConfig.compression_pattern: per-module budgets, each key's modules in their own segment of z."""

import json
import math

import pytest
import torch
import transformers as tf
from helpers import VOCAB, inputs_for, lm_losses, tiny_llama

from hf_roast import RoastConfig, RoastModel, get_roast_model
from hf_roast.backends.pytorch import materialize_weight
from hf_roast.mapping import LayerMapping

TILE = (16, 16)
PATTERN = {r"layers\.0\..*": 4, "mlp": 8}  # the first matching key wins: layer 0's MLP reads at 4x


def compressed(pattern=PATTERN, build=tiny_llama, **kw):
    kw.setdefault("compression", 16)
    return get_roast_model(build(), RoastConfig(tile=TILE, compression_pattern=pattern, **kw))


def expected_slot_tiles(model, pattern, compression):
    """z's length in slot tiles from the module sizes: each key's modules at its compression, the rest pooled."""
    t = TILE[0] * TILE[1]
    tiles = {s.name: s.n_tiles(TILE) for s in model.plan.modules}
    layer0 = [n for n in tiles if ".layers.0." in n]
    mlp = [n for n in tiles if ".mlp." in n and n not in layer0]
    pooled = [n for n in tiles if n not in layer0 and n not in mlp]

    def seg(names, c):
        return math.ceil(math.ceil(sum(tiles[n] for n in names) * t / c) / t)

    return seg(pooled, compression) + seg(layer0, pattern[r"layers\.0\..*"]) + seg(mlp, pattern["mlp"])


# ---- configuration --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pattern, match",
    [
        ("mlp", "must be a dict"),
        ([["mlp"]], "must be a dict"),
        ([["mlp", 4], ["mlp", 8]], "repeats a key"),
        ({"(": 4}, r"key '\(' is not a valid regular expression"),
        ({"(?i)mlp": 4}, "not a valid regular expression"),
        ({"": 4}, "keys are module names or regexes"),
        ({3: 4}, "keys are module names or regexes"),
        ({"mlp": 0.5}, r"compression_pattern\['mlp'\]=0.5 < 1.0"),
        ({"mlp": float("nan")}, r"compression_pattern\['mlp'\] must be a finite number"),
        ({"mlp": float("inf")}, "must be a finite number"),
        ({"mlp": True}, "must be a finite number"),
        ({"mlp": "8"}, "must be a finite number"),
    ],
)
def test_config_validation(pattern, match):
    with pytest.raises(ValueError, match=match):
        RoastConfig(compression_pattern=pattern)


def test_config_normalises_and_stores_the_pattern_as_ordered_pairs():
    config = RoastConfig(compression_pattern={"mlp": 8, "attn": 2})
    assert config.compression_pattern == {"mlp": 8.0, "attn": 2.0}
    stored = config.to_dict()["compression_pattern"]
    assert stored == [["mlp", 8.0], ["attn", 2.0]]  # pairs: a JSON writer with sort_keys keeps the order
    again = RoastConfig.from_dict(json.loads(json.dumps(config.to_dict(), sort_keys=True)))
    assert list(again.compression_pattern) == ["mlp", "attn"]
    assert RoastConfig(compression_pattern={}).compression_pattern is None


def test_a_key_that_matches_no_module_raises_naming_it():
    with pytest.raises(ValueError, match=r"key 'mpl' matches no compressed module.*model\.layers\.0"):
        compressed({"mlp": 8, "mpl": 4})
    with pytest.raises(ValueError, match="key 'lm_head' matches no compressed module"):
        compressed({"lm_head": 2})  # not a target (the output layer)
    with pytest.raises(
        ValueError, match=r"key 'up_proj' matches only modules that an earlier key already claims"
    ):
        compressed({"mlp": 8, "up_proj": 4})


def test_a_segment_smaller_than_one_tile_raises_naming_the_key_and_the_fix():
    with pytest.raises(
        ValueError, match=r"compression_pattern\['k_proj'\]=64 .*less than one 16x16 mapping tile.*at most"
    ):
        compressed({"k_proj": 64})


# ---- the layout -----------------------------------------------------------------------------------------
def test_z_is_the_sum_of_the_segments_and_the_report_counts_it(capsys):
    model = compressed()
    plan = model.plan
    assert plan.num_slot_tiles == expected_slot_tiles(model, {k: float(v) for k, v in PATTERN.items()}, 16.0)
    report = model.compression_report()
    assert report["target"]["stored_parameters"] == plan.num_slots == model.roast_store.z.numel()
    model.print_trainable_parameters()
    assert f"compression: {report['model']['ratio']:.2f}x" in capsys.readouterr().out
    by_name = {s.name: s for s in plan.modules}
    segments = {n: (s.segment_start_tile, s.segment_tiles) for n, s in by_name.items()}
    assert segments["model.layers.0.mlp.up_proj"] == segments["model.layers.0.self_attn.q_proj"]  # first key
    assert segments["model.layers.1.mlp.up_proj"] != segments["model.layers.0.mlp.up_proj"]
    assert segments["model.layers.1.self_attn.q_proj"][0] == 0  # pooled, first in z


@pytest.mark.parametrize("mapper", ["stable", "roast", "hashednet"])
def test_every_layer_reads_only_its_segment(mapper):
    model = compressed(mapper=mapper, init="random")
    plan = model.plan
    t = plan.tile_numel
    z = torch.arange(plan.num_slots, dtype=torch.float64)
    for _, layer in model.roast_layers():
        spec = layer.spec
        unit = LayerMapping.build(plan, spec)
        unit.tile_scale = torch.ones_like(unit.tile_scale)
        read = materialize_weight(z, unit, torch.float64, scratch=False).abs()
        if plan.is_tiled:
            lo, hi = spec.segment_start_tile * t, (spec.segment_start_tile + spec.segment_tiles) * t
        else:
            lo, hi = spec.segment_start, spec.segment_start + spec.segment_size
        assert lo <= read.min() and read.max() < hi, spec.name


def test_no_pattern_is_exactly_the_mapping_without_one():
    a = get_roast_model(tiny_llama(), RoastConfig(compression=8, tile=TILE))
    b = get_roast_model(tiny_llama(), RoastConfig(compression=8, tile=TILE, compression_pattern={}))
    assert a.plan.to_dict() == b.plan.to_dict() and a.plan.digest() == b.plan.digest()
    assert torch.equal(a.roast_store.z, b.roast_store.z)
    assert all("segment_tiles" not in m for m in a.roast_config_dict()["plan"]["modules"])


def test_num_parameters_leaves_the_rest_to_the_pooled_modules():
    model = compressed({"mlp": 8}, compression=None, num_parameters=6000)  # the MLPs take 4608 at 8x
    assert model.plan.num_slots == 6144  # rounded up to whole tiles, as without a pattern
    assert {s.segment_tiles for s in model.plan.modules} == {18, 6}
    with pytest.raises(
        ValueError, match=r"no compression_pattern key matches \(24576 weights\) get 0 values"
    ):
        compressed({"mlp": 8}, compression=None, num_parameters=4608)
    with pytest.raises(ValueError, match="every module matches a key"):
        compressed({"layers": 8}, compression=None, num_parameters=4096)


# ---- initialisation -------------------------------------------------------------------------------------
def test_least_squares_init_recovers_a_key_at_1x_exactly():
    """The projection scatters into each segment with its own denominators: a key at 1x is an exact copy."""
    dense = tiny_llama()
    weights = {
        n: m.weight.detach().clone() for n, m in dense.named_modules() if n.endswith("self_attn.q_proj")
    }
    model = get_roast_model(dense, RoastConfig(compression=8, tile=TILE, compression_pattern={"q_proj": 1}))
    for name, layer in model.roast_layers():
        if name in weights:
            assert torch.equal(layer.materialize_weight(), weights[name]), name


def test_calibrated_init_works_with_segments():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, VOCAB, (2, 12), generator=gen) for _ in range(2)]
    model = get_roast_model(
        tiny_llama(),
        RoastConfig(compression=4, tile=TILE, compression_pattern={"mlp": 2}),
        calibration_data=batches,
    )
    report = model.roast_store.calibration_report
    assert report["output_error_after"] <= report["output_error_before"]
    assert torch.isfinite(model.roast_store.z).all()


# ---- persistence and training ---------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_logits(tmp_path):
    pattern = {"mlp": 8, r"layers\.0\..*": 4}  # not in sorted order: the stored order must survive
    model = compressed(pattern)
    inputs = inputs_for("llama")
    with torch.no_grad():
        model.roast_store.z.add_(
            0.01 * torch.randn(model.roast_store.z.shape, generator=torch.Generator().manual_seed(1))
        )
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path, model_card=False)
    raw = json.loads((tmp_path / "roast_config.json").read_text())
    assert raw["format_version"] == "1.4"
    assert raw["compression_pattern"] == [["mlp", 8.0], [r"layers\.0\..*", 4.0]]
    assert any("segment_tiles" in m for m in raw["plan"]["modules"])
    loaded = RoastModel.from_pretrained(tmp_path)
    auto = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.plan == model.plan and list(loaded.roast_config.compression_pattern) == list(pattern)
    for other in (loaded, auto):
        with torch.no_grad():
            assert torch.equal(other(**inputs).logits, expected)
    assert torch.equal(loaded.roast_store.scaler_inv, model.roast_store.scaler_inv)


def test_a_tiny_llama_with_a_pattern_trains():
    model = compressed(init="random")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 16), generator=gen)
    losses = lm_losses(model, torch.optim.Adam(model.parameters(), lr=3e-3), ids, 30)
    assert losses[-1] < 0.8 * losses[0], losses
