"""save_pretrained -> from_pretrained: compressed on disk, bit-identical back, loud on damage."""

import json
import os

import pytest
import torch
from helpers import inputs_for, tiny_bert_classifier, tiny_gpt2, tiny_llama
from safetensors import safe_open

from hf_roast import RoastConfig, RoastModel, get_roast_model
from hf_roast.mapping import plan_digest


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(
    "name, build, config",
    [
        ("llama", tiny_llama, RoastConfig(compression=8.0, tile=(16, 16))),
        ("gpt2", tiny_gpt2, RoastConfig(compression=4.0, tile=(16, 16), mapper="roast", sign="element")),
        ("bert", tiny_bert_classifier, RoastConfig(compression=4.0, tile=(16, 16), compress_embeddings=True)),
        ("llama", tiny_llama, RoastConfig(compression=4.0, tile=(16, 16), mapper="hashednet", scaler="v1")),
    ],
)
def test_round_trip_is_bit_identical(tmp_path, name, build, config):
    rm = get_roast_model(build(), config)
    inputs = inputs_for(name)
    expected = logits(rm, inputs)
    rm.save_pretrained(tmp_path)
    loaded = RoastModel.from_pretrained(tmp_path)
    assert isinstance(loaded, RoastModel) and not loaded.training
    assert torch.equal(logits(loaded, inputs), expected)
    assert loaded.plan == rm.plan
    assert torch.equal(loaded.roast_store.scaler_inv, rm.roast_store.scaler_inv)
    assert loaded.roast_config.to_dict() == rm.roast_config.to_dict()


def test_checkpoint_holds_z_once_and_no_dense_copy(tmp_path):
    rm = get_roast_model(tiny_llama(), RoastConfig(compression=8.0, tile=(16, 16)))
    rm.save_pretrained(tmp_path)
    assert {"config.json", "roast_config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    compressed = {s.name for s in rm.plan.modules}
    with safe_open(os.path.join(tmp_path, "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("roast_store.z").get_shape() == [rm.roast_store.z.numel()]
        # A compressed module's weight may appear only as an empty marker, never with values.
        for k in keys:
            if k.endswith(".weight") and k.rsplit(".", 1)[0] in compressed:
                assert 0 in f.get_slice(k).get_shape()
    assert [k for k in keys if "roast_store" in k] == ["roast_store.z"]
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    stored = json.load(open(os.path.join(tmp_path, "roast_config.json")))
    for field in (
        "compression",
        "mapper",
        "tile",
        "sign",
        "seed",
        "init",
        "scaler",
        "dtype",
        "mapping_version",
    ):
        assert field in stored
    plan = stored["plan"]
    assert plan["mapping_version"] == 1 and len(plan["modules"]) == 14
    assert {"name", "rows", "cols", "scale", "kind", "tile_offset"} <= set(plan["modules"][0])
    assert json.load(open(os.path.join(tmp_path, "config.json")))["architectures"] == ["LlamaForCausalLM"]


def test_checkpoint_size_shrinks_as_the_report_says(tmp_path):
    sizes, reports = {}, {}
    for c in (2.0, 8.0):
        rm = get_roast_model(tiny_llama(), RoastConfig(compression=c, tile=(16, 16)))
        rm.save_pretrained(tmp_path / str(c))
        sizes[c] = os.path.getsize(tmp_path / str(c) / "model.safetensors")
        reports[c] = rm.compression_report()["model"]["stored_bytes"]
    for c in sizes:
        # safetensors adds only a JSON header (a few KB) to the raw bytes the report counts
        assert reports[c] <= sizes[c] < reports[c] + 16_384
    assert sizes[8.0] < sizes[2.0]
    dense_target = rm.compression_report()["target"]["dense_bytes"]
    assert sizes[2.0] - sizes[8.0] == pytest.approx(dense_target / 2 - dense_target / 8, abs=16_384)


@pytest.fixture
def saved(tmp_path):
    rm = get_roast_model(tiny_llama(), RoastConfig(compression=4.0, tile=(16, 16)))
    rm.save_pretrained(tmp_path)
    return tmp_path


def _edit_roast_config(path, edit, redigest=True):
    """Edit roast_config.json; ``redigest`` recomputes the plan digest, as a checkpoint written for
    another architecture (rather than a tampered file) would carry."""
    p = os.path.join(path, "roast_config.json")
    d = json.load(open(p))
    edit(d)
    if redigest:
        d["plan_sha256"] = plan_digest(d["plan"])
    json.dump(d, open(p, "w"))


def test_an_edited_plan_is_refused_by_its_digest(saved):
    def rescale(d):
        d["plan"]["modules"][0]["scale"] *= 1.5  # would load as a silently different model

    _edit_roast_config(saved, rescale, redigest=False)
    with pytest.raises(ValueError, match="plan_sha256"):
        RoastModel.from_pretrained(saved)


def test_mismatched_mapping_version_is_refused(saved):
    _edit_roast_config(saved, lambda d: d.update(mapping_version=999))
    with pytest.raises(ValueError, match="mapping version"):
        RoastModel.from_pretrained(saved)


def test_mismatched_module_list_is_refused(saved):
    def rename(d):
        d["plan"]["modules"][3]["name"] = "model.layers.0.self_attn.no_such_proj"

    _edit_roast_config(saved, rename)
    with pytest.raises(ValueError, match="module list"):
        RoastModel.from_pretrained(saved)


def test_mismatched_module_shape_is_refused(saved):
    def reshape(d):  # a self-consistent plan for a model whose first module has one more row
        d["plan"]["modules"][0]["rows"] += 1
        tr, tc = d["plan"]["tile"]
        offset = 0
        for m in d["plan"]["modules"]:
            m["tile_offset"] = offset
            offset += -(-m["rows"] // tr) * -(-m["cols"] // tc)

    _edit_roast_config(saved, reshape)
    with pytest.raises(ValueError, match="module list"):
        RoastModel.from_pretrained(saved)


def test_truncated_safetensors_is_refused(saved):
    path = os.path.join(saved, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        RoastModel.from_pretrained(saved)


def test_not_a_roast_checkpoint_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises((FileNotFoundError, ValueError), match="roast"):
        RoastModel.from_pretrained(tmp_path)


def test_loaded_model_trains(saved):
    loaded = RoastModel.from_pretrained(saved)
    loaded.train()
    ids = inputs_for("llama")["input_ids"]
    loaded(input_ids=ids, labels=ids).loss.backward()
    assert loaded.roast_store.z.grad.abs().sum() > 0


def test_auto_loaded_then_merged_model_saves_as_dense(saved, tmp_path):
    """A model loaded through an Auto class, wrapped and densified, must not save itself as ROAST."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(saved)
    rm = RoastModel(base, RoastConfig(compression=4.0, tile=(16, 16)))
    inputs = inputs_for("llama")
    expected = logits(rm, inputs)
    dense = rm.merge_and_unload()
    dense.save_pretrained(tmp_path / "dense")
    config = json.load(open(tmp_path / "dense" / "config.json"))
    assert "quantization_config" not in config
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not hasattr(again, "roast_store")
    torch.testing.assert_close(logits(again, inputs), expected, rtol=1e-5, atol=1e-5)
