"""``hf-roast memory`` on a tiny Llama: both arms run in their own processes and report the figures the
README's training-memory table is built from, with and without gradient checkpointing."""

from __future__ import annotations

import json
import sys

import pytest
from hf_roast.scripts import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the RSS high-water mark from /proc")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_memory_script_reports_both_arms(tmp_path, capsys, checkpointing):
    out = tmp_path / "memory.json"
    argv = ["--hidden", "64", "--layers", "2", "--intermediate", "128", "--heads", "4", "--vocab", "256"]
    argv += ["--batch", "2", "--seq", "16", "--steps", "1", "--json", str(out)]
    if checkpointing:
        argv.append("--gradient-checkpointing")
    assert memory.main(argv) == 0
    results = json.loads(out.read_text())
    assert results["args"]["gradient_checkpointing"] is checkpointing
    dense, roast = results["results"]["dense"], results["results"]["hf-roast"]
    ratio = dense["param_bytes"] / roast["param_bytes"]
    assert 10 < ratio < 17, ratio  # 16x on the compressed tensors; norms stay dense
    assert (
        dense["gradient_checkpointing"] is checkpointing and roast["gradient_checkpointing"] is checkpointing
    )
    assert dense["peak_training_rss_mib"] > 0 and roast["peak_training_rss_mib"] > 0
    assert all(r["final_loss"] == r["final_loss"] for r in (dense, roast))  # finite, not NaN
    assert "peak training RSS MiB" in capsys.readouterr().out
