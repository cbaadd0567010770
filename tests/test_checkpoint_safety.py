"""Checkpoint safety: atomic saves, loading that never runs code (no pickle, no remote code), format and
mapping versions, and the health of loaded weights."""

import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers as tf
from helpers import inputs_for, tiny_llama
from safetensors.torch import load_file, save_file

from hf_roast import RoastConfig, RoastModel, get_roast_model

CONFIG = RoastConfig(compression=8.0, tile=(16, 16))


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture()
def saved(tmp_path):
    rm = get_roast_model(tiny_llama(), CONFIG)
    path = tmp_path / "ckpt"
    rm.save_pretrained(path)
    return rm, path


def _edit(path, name, edit):
    p = os.path.join(path, name)
    d = json.load(open(p))
    edit(d)
    json.dump(d, open(p, "w"))


# ---- atomic saves --------------------------------------------------------------------------------------
def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(saved, monkeypatch):
    rm, path = saved
    inputs = inputs_for("llama")
    before = _logits(RoastModel.from_pretrained(path), inputs)
    files_before = sorted(os.listdir(path))
    other = get_roast_model(tiny_llama(seed=1), CONFIG)

    def die(*args, **kwargs):  # runs after the new weights were written
        raise OSError("disk full")

    monkeypatch.setattr("hf_roast.checkpoint.card.write_model_card", die)
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(path)
    assert sorted(os.listdir(path)) == files_before
    assert torch.equal(_logits(RoastModel.from_pretrained(path), inputs), before)
    assert [n for n in os.listdir(path.parent) if n.startswith(".")] == [], "the staging folder is removed"


def test_a_killed_saving_process_leaves_the_previous_checkpoint(saved):
    """SIGKILL in the middle of save_pretrained (after the weights, before the config): no cleanup runs."""
    rm, path = saved
    inputs = inputs_for("llama")
    before = _logits(RoastModel.from_pretrained(path), inputs)
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import hf_roast.checkpoint.card
        from helpers import tiny_llama
        from hf_roast import RoastConfig, get_roast_model
        hf_roast.checkpoint.card.write_model_card = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        get_roast_model(tiny_llama(seed=1), RoastConfig(compression=8.0, tile=(16, 16))).save_pretrained({str(path)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert torch.equal(_logits(RoastModel.from_pretrained(path), inputs), before)


def test_a_save_keeps_foreign_files_and_drops_stale_weights(saved):
    rm, path = saved
    (path / "tokenizer.json").write_text("{}")
    (path / "checkpoint-5").mkdir()
    (path / "checkpoint-5" / "optimizer.pt").write_bytes(b"x")
    (path / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    rm.save_pretrained(path)
    assert (path / "tokenizer.json").read_text() == "{}"
    assert (path / "checkpoint-5" / "optimizer.pt").read_bytes() == b"x"
    assert not (path / "model-00001-of-00002.safetensors").exists()
    RoastModel.from_pretrained(path)


def test_only_the_main_process_writes(tmp_path):
    rm = get_roast_model(tiny_llama(), CONFIG)
    assert rm.save_pretrained(tmp_path / "x", is_main_process=False) == []
    assert not (tmp_path / "x").exists()


# ---- loading never executes code -----------------------------------------------------------------------
class _Boom:
    def __reduce__(self):
        return (open, (os.environ["HF_ROAST_TEST_MARKER"], "w"))


def _malicious_pickle(path, marker, monkeypatch):
    monkeypatch.setenv("HF_ROAST_TEST_MARKER", str(marker))
    with open(path, "wb") as f:
        pickle.dump({"roast_store.z": _Boom()}, f)


def test_pickle_beside_safetensors_is_ignored_with_a_warning_and_never_run(saved, monkeypatch, tmp_path):
    rm, path = saved
    marker = tmp_path / "pwned"
    _malicious_pickle(path / "pytorch_model.bin", marker, monkeypatch)
    with pytest.warns(UserWarning, match="pytorch_model.bin"):
        loaded = RoastModel.from_pretrained(path)
    tf.AutoModelForCausalLM.from_pretrained(path)
    assert not marker.exists()
    assert torch.equal(_logits(loaded, inputs_for("llama")), _logits(rm, inputs_for("llama")))


def test_a_folder_with_only_pickled_weights_is_refused(saved, monkeypatch, tmp_path):
    _, path = saved
    marker = tmp_path / "pwned"
    os.remove(path / "model.safetensors")
    _malicious_pickle(path / "pytorch_model.bin", marker, monkeypatch)
    with pytest.raises(ValueError, match="pickle"):
        RoastModel.from_pretrained(path)
    assert not marker.exists()


def test_trainer_state_files_are_not_warned_about(saved):
    _, path = saved
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (path / name).write_bytes(b"not read")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RoastModel.from_pretrained(path)


def test_trust_remote_code_is_ignored(saved):
    _, path = saved
    _edit(path, "config.json", lambda d: d.update(auto_map={"AutoModelForCausalLM": "evil.Model"}))
    (path / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.warns(UserWarning, match="trust_remote_code is ignored"):
        RoastModel.from_pretrained(path, trust_remote_code=True)


# ---- versions --------------------------------------------------------------------------------------------
def test_a_newer_major_format_is_refused(saved):
    _, path = saved
    _edit(path, "roast_config.json", lambda d: d.update(format_version="2.0"))
    with pytest.raises(ValueError, match="format_version 2.0"):
        RoastModel.from_pretrained(path)


def test_unknown_keys_of_a_newer_minor_format_load_with_a_warning(saved):
    rm, path = saved
    # (z_bits, this test's unknown key before format 1.2, is a field now: another name plays the newer key)
    _edit(path, "roast_config.json", lambda d: d.update(format_version="1.9", z_codebook="nf4"))
    with pytest.warns(UserWarning, match="z_codebook"):
        loaded = RoastModel.from_pretrained(path)
    assert torch.equal(_logits(loaded, inputs_for("llama")), _logits(rm, inputs_for("llama")))


def test_another_mapping_version_is_refused_naming_both(saved):
    _, path = saved
    _edit(path, "roast_config.json", lambda d: d.update(mapping_version=0))
    with pytest.raises(ValueError, match="mapping version 0, but this hf_roast implements version 1"):
        RoastModel.from_pretrained(path)


def test_an_edited_dtype_is_refused(saved):
    _, path = saved
    _edit(path, "roast_config.json", lambda d: d.update(dtype="bfloat16"))
    with pytest.raises(ValueError, match="stored as F32"):
        RoastModel.from_pretrained(path)


@pytest.mark.parametrize("field", ["mapper", "sign"])
def test_a_config_that_disagrees_with_its_plan_is_refused(saved, field):
    _, path = saved
    _edit(path, "roast_config.json", lambda d: d.update({field: "roast" if field == "mapper" else "element"}))
    with pytest.raises(ValueError, match=field):
        RoastModel.from_pretrained(path)


# ---- health of loaded weights ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_shared_array_with_nan_or_inf_is_refused(saved, bad):
    _, path = saved
    state = load_file(path / "model.safetensors")
    state["roast_store.z"][7] = bad
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    for load in (RoastModel.from_pretrained, tf.AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=r"roast_store.z holds 1 NaN or inf"):
            load(path)
