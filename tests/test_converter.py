"""``hf-roast compress MODEL_DIR OUT_DIR``: the command-line converter round trip."""

import json

import pytest
import torch
import transformers as tf
import yaml
from helpers import inputs_for, tiny_llama
from hf_roast.scripts.compress_folder import main as compress_main

from hf_roast import RoastConfig, RoastModel, get_roast_model
from hf_roast.cli import main as cli_main


@pytest.fixture
def dense_dir(tmp_path):
    path = tmp_path / "dense"
    tiny_llama().save_pretrained(path)
    (path / "README.md").write_text("---\nlicense: mit\n---\n# tiny llama\n")
    (path / "tokenizer_config.json").write_text("{}")
    return path


def test_converter_round_trip_matches_library_compression(dense_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main(
        [
            "compress",
            str(dense_dir),
            str(out),
            "--compression",
            "4",
            "--tile",
            "16",
            "16",
            "--base-model",
            "org/tiny-llama",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "ROAST compress" in captured.err  # the per-module progress bar
    assert "4.00x" in captured.out
    expected = get_roast_model(tiny_llama(), RoastConfig(compression=4.0, tile=(16, 16)))
    inputs = inputs_for("llama")
    with torch.no_grad():
        want = expected(**inputs).logits
        assert torch.equal(tf.AutoModelForCausalLM.from_pretrained(out)(**inputs).logits, want)
        assert torch.equal(RoastModel.from_pretrained(out)(**inputs).logits, want)
    assert (out / "tokenizer_config.json").exists()  # side files travel with the checkpoint
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert meta["base_model"] == "org/tiny-llama" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "mit"  # inherited from the dense model's card
    with open(out / "roast_config.json") as f:
        assert json.load(f)["compression"] == 4.0


def test_converter_options_reach_the_config(dense_dir, tmp_path):
    out = tmp_path / "out"
    assert (
        compress_main(
            [
                str(dense_dir),
                str(out),
                "--num-parameters",
                "4096",
                "--tile",
                "8",
                "8",
                "--mapper",
                "roast",
                "--target-modules",
                "q_proj",
                "v_proj",
                "--seed",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    with open(out / "roast_config.json") as f:
        cfg = json.load(f)
    assert cfg["mapper"] == "roast" and cfg["seed"] == 3 and cfg["tile"] == [8, 8]
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    assert {m["name"].split(".")[-1] for m in cfg["plan"]["modules"]} == {"q_proj", "v_proj"}
    assert RoastModel.from_pretrained(out).roast_store.z.numel() == cfg["plan"]["num_slots"]


def test_converter_refuses_bad_input(dense_dir, tmp_path):
    with pytest.raises(SystemExit, match="compression"):
        compress_main([str(dense_dir), str(tmp_path / "o1"), "--compression", "0.5"])
    with pytest.raises(SystemExit, match="config.json"):
        compress_main([str(tmp_path), str(tmp_path / "o2")])
    with pytest.raises(SystemExit, match="must differ"):
        compress_main([str(dense_dir), str(dense_dir)])
    compress_main([str(dense_dir), str(tmp_path / "roast"), "--quiet"])
    with pytest.raises(SystemExit, match="already a ROAST checkpoint"):
        compress_main([str(tmp_path / "roast"), str(tmp_path / "o3")])


def test_converter_z_bits_writes_packed_z(dense_dir, tmp_path, capsys):
    out = tmp_path / "out4"
    args = [str(dense_dir), str(out), "--compression", "4", "--tile", "8", "16", "--z-bits", "4", "--quiet"]
    assert compress_main(args + ["--z-group-size", "64"]) == 0
    assert "z 4-bit" in capsys.readouterr().out
    cfg = json.loads((out / "roast_config.json").read_text())
    assert cfg["z_bits"] == 4 and cfg["z_group_size"] == 64 and cfg["z_qat"] is False
    loaded = RoastModel.from_pretrained(out)
    reference = get_roast_model(
        tiny_llama(), RoastConfig(compression=4, tile=(8, 16), z_bits=4, z_group_size=64)
    )
    assert torch.equal(loaded.roast_store.z_codes, reference.roast_store.z_codes)
    assert torch.equal(loaded.roast_store.z_scales, reference.roast_store.z_scales)
    with pytest.raises(SystemExit):  # argparse refuses bits outside the vocabulary
        compress_main([str(dense_dir), str(tmp_path / "bad"), "--z-bits", "5"])
    with pytest.raises(SystemExit, match="z_group_size"):
        compress_main([str(dense_dir), str(tmp_path / "bad"), "--z-bits", "8", "--z-group-size", "7"])


def test_converter_takes_per_module_budgets(dense_dir, tmp_path):
    out = tmp_path / "out"
    argv = [str(dense_dir), str(out), "--compression", "8", "--tile", "8", "8", "--quiet"]
    assert compress_main([*argv, "--compression-pattern", "mlp=2", r"layers\.0\..*=4"]) == 0
    expected = get_roast_model(
        tiny_llama(),
        RoastConfig(
            compression=8.0, tile=(8, 8), compression_pattern=[("mlp", 2.0), (r"layers\.0\..*", 4.0)]
        ),
    )
    inputs = inputs_for("llama")
    with torch.no_grad():
        assert torch.equal(RoastModel.from_pretrained(out)(**inputs).logits, expected(**inputs).logits)
    with pytest.raises(SystemExit, match="KEY=C"):
        compress_main([str(dense_dir), str(tmp_path / "o1"), "--compression-pattern", "mlp"])
    with pytest.raises(SystemExit, match="no_such_module"):
        compress_main([str(dense_dir), str(tmp_path / "o2"), "--compression-pattern", "no_such_module=4"])
