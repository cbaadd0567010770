"""``python -m benchmarks.sliceout_step``: the SliceOut step-time table runs end to end (tiny model, MiniLM)."""

import json

import pytest


def test_sliceout_step_times_every_setting(capsys, tmp_path):
    from benchmarks.sliceout_step import SETTINGS, main

    out_json = tmp_path / "step.json"
    argv = ["--steps", "2", "--warmup", "1", "--hidden", "64", "--intermediate", "160", "--layers", "2"]
    argv += [
        "--head-dim",
        "16",
        "--context",
        "16",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--json",
        str(out_json),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "vs keep 1" in printed and "contiguous" in printed
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["keep"], r["mode"]) for r in rows] == [(k, m if k < 1 else "-") for k, m in SETTINGS]
    assert rows[0]["ratio"] == 1.0 and all(r["median_ms"] > 0 and r["peak_mib"] > 0 for r in rows)
    assert all(r["final_loss"] == r["final_loss"] for r in rows)  # finite, not NaN


def test_sliceout_step_times_the_minilm_classifier(capsys):
    """``--model minilm``: the fine-tuning experiment's model (skipped without the pinned MiniLM package)."""
    from hf_roast.scripts.pinned_models import minilm_dir

    try:
        minilm_dir()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(f"the pinned MiniLM is not installed: {exc}")
    from benchmarks.sliceout_step import SETTINGS, main

    argv = ["--model", "minilm", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--context", "8"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "all-MiniLM-L6-v2 classifier" in lines[0] and len(lines) == 2 + len(SETTINGS)
