"""``python -m benchmarks.grad_probe``: the per-module gradient spread that motivates ``module_balance``."""


def test_grad_probe_prints_every_module_before_and_after_training(capsys, tmp_path):
    from benchmarks.grad_probe import main

    out_json = tmp_path / "probe.json"
    assert main(["--tiny", "--steps", "2", "--batches", "1", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "largest / smallest after training" in printed
    import json

    table = json.loads(out_json.read_text())
    assert len(table["trained"]) == 28 == len(table["init"])  # 4 layers x 7 projections
    assert all(v > 0 for v in table["trained"].values())
