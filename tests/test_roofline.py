"""The roofline model of the kernels (a model, not a measurement): its byte and FLOP counts behave."""

import pytest

from hf_roast.backends.triton import roofline


def ratio(rows, kernel, tier, dtype, zstore, gpu="H100"):
    (row,) = [
        r
        for r in rows
        if (r["kernel"], r["tier"], r["dtype"], r["zstore"], r["gpu"]) == (kernel, tier, dtype, zstore, gpu)
    ]
    return row["ratio"]


def test_decode_is_memory_bound_and_packed_z_reads_fewer_bytes():
    rows = roofline.model()
    assert ratio(rows, "fwd", "decode", "bf16", "act") == pytest.approx(1.0, abs=0.02)  # + the tile tables
    assert ratio(rows, "fwd", "decode", "bf16", "int8") < 0.55
    assert ratio(rows, "fwd", "decode", "bf16", "int4") < 0.3
    assert ratio(rows, "fwd", "prefill", "bf16", "act") == pytest.approx(1.0)  # math-bound: the same FLOPs
    assert ratio(rows, "fwd", "prefill", "fp32", "act") < 0.5  # tf32x3 against fp32 FMA
    assert ratio(rows, "grad_z", "decode", "bf16", "act") > 1  # one fp32 atomic per weight
    assert {r["bound"] for r in rows if r["tier"] == "decode"} == {"memory"}


def test_markdown_has_a_line_per_case():
    rows = roofline.model()
    assert roofline.markdown(rows).count("\n") == len(rows) // len(roofline.GPUS) + 1


def test_bench_numerics_check_passes_on_the_kernels_and_catches_a_wrong_one(monkeypatch):
    """The GPU benchmark's first step, run here under the interpreter on small odd shapes."""
    import argparse
    import importlib.util
    import pathlib

    import torch

    pytest.importorskip("triton")
    from hf_roast.backends.triton import ops
    from hf_roast.backends.triton.roast_matmul import INTERPRETED

    if not INTERPRETED:
        pytest.skip("runs the kernels under the interpreter")
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_for_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(compression=4.0, tile="16x16")
    cases = ((1, (40, 24)), (19, (40, 24)))
    for dtype in (torch.float32, torch.bfloat16):
        assert bench.check_numerics(torch.device("cpu"), dtype, args, cases) == []
    real = ops.triton_roast_linear
    monkeypatch.setattr(ops, "triton_roast_linear", lambda x, z, b, lm: real(x, z, b, lm) * 1.01)
    problems = bench.check_numerics(torch.device("cpu"), torch.float32, args, cases)
    assert problems and all("relative error" in p for p in problems)
