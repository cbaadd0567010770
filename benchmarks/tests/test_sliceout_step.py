"""``python -m benchmarks.sliceout_step``: the SliceOut step-time table runs end to end (tiny model)."""

import json


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
