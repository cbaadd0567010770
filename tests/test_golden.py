"""Committed checkpoints pin the format: today's code must load them and reproduce their logits."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from hf_roast import RoastModel

GOLDEN = sorted(p for p in (Path(__file__).parent / "golden").iterdir() if p.is_dir())


def test_there_are_golden_checkpoints():
    assert len(GOLDEN) >= 3, "tests/golden lost its fixtures (run tests/golden/make_golden.py only to add)"


@pytest.mark.parametrize("folder", GOLDEN, ids=[p.name for p in GOLDEN])
def test_golden_checkpoint_reproduces_its_logits(folder):
    expected = load_file(folder / "expected.safetensors")
    for model in (RoastModel.from_pretrained(folder), tf.AutoModelForCausalLM.from_pretrained(folder)):
        with torch.no_grad():
            logits = model(input_ids=expected["input_ids"]).logits
        torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)


def test_a_format_1_0_checkpoint_still_loads(tmp_path):
    """1.0 wrote ``format_version: 1`` (an int) and no plan digest: it loads, to the same logits."""
    folder = shutil.copytree(GOLDEN[0], tmp_path / "v1.0")
    for name in ("roast_config.json", "config.json"):
        path = os.path.join(folder, name)
        d = json.load(open(path))
        stored = d["quantization_config"] if name == "config.json" else d
        stored["format_version"] = 1
        del stored["plan_sha256"]
        json.dump(d, open(path, "w"))
    expected = load_file(folder / "expected.safetensors")
    with torch.no_grad():
        logits = RoastModel.from_pretrained(folder)(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
