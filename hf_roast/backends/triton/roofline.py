"""A roofline model of the fused kernels against cuBLAS (``nn.Linear``): a model, not a measurement.

    python -m hf_roast.backends.triton.roofline [--in 4096 --out 4096 --markdown]

For each kernel and row tier it counts the bytes moved through DRAM and the FLOPs, and predicts the time at
the GPU's peak bandwidth and peak math rate: ``max(bytes / bandwidth, flops / peak)``. Both sides are
modelled alike, so the ratio ROAST / dense is the model's expected slowdown (below 1: faster).

Assumptions (what the model leaves out is stated, so a measurement can be set against it):

* every operand crosses DRAM once (perfect reuse in L2 and shared memory, for both kernels);
* ROAST reads one z value per weight (its dtype, or packed codes plus one fp32 scale per group) and one slot
  and scale per mapping tile (32x32); with compression ``c`` the z values repeat ``c`` times, so if z stays
  in L2 the decode traffic could fall by up to ``c``: the model does not count on it;
* grad_z writes one fp32 atomic per weight (``red`` in L2; counted as a DRAM read and write of dz); dense
  dW writes its gradient once;
* math: half precision at the tensor-core peak; fp32 on ROAST with TF32 off is tf32x3, three TF32 products
  (a third of the TF32 peak), against cuBLAS' fp32 FMA (SGEMM); with TF32 on both use the TF32 peak;
* launch overhead, the tail of the last wave, the dequantisation and hashing work are not counted.

Datasheet peaks (dense, no sparsity): A100 SXM4 80 GB and H100 SXM5.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .launch import TIERS

TIER_ROWS = {"decode": 1, "mid": 48, "prefill": 4096}
TILE = 32 * 32
GROUP = 128


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes / s
    half: float  # bf16 / fp16 tensor FLOP / s
    tf32: float
    fp32: float  # CUDA-core FMA


GPUS = (
    GPU("A100", 2.039e12, 312e12, 156e12, 19.5e12),
    GPU("H100", 3.35e12, 989e12, 494e12, 66.9e12),
)
ACT_BYTES = {"bf16": 2, "fp32": 4, "tf32": 4}
Z_BYTES = {"act": None, "fp32": 4.0, "int8": 1 + 4 / GROUP, "int4": 0.5 + 4 / GROUP}
"""Bytes per weight read from z ("act": the activation dtype's)."""


def _peak(gpu: GPU, dtype: str, roast: bool) -> float:
    if dtype == "bf16":
        return gpu.half
    if dtype == "tf32":
        return gpu.tf32
    return gpu.tf32 / 3 if roast else gpu.fp32  # TF32 off: tf32x3 against SGEMM


def traffic(
    kernel: str, rows: int, n_in: int, n_out: int, dtype: str, zstore: str
) -> tuple[float, float, float]:
    """(ROAST bytes, dense bytes, FLOPs) of one kernel call."""
    a = ACT_BYTES[dtype]
    weights = n_in * n_out
    z = Z_BYTES[zstore] or a
    tables = weights / TILE * 12  # int64 slot + fp32 scale per tile
    flops = 2.0 * rows * weights
    if kernel in ("fwd", "grad_input"):
        acts = rows * (n_in + n_out) * a
        return acts + weights * z + tables, acts + weights * a, flops
    if kernel == "grad_z":  # dz: an fp32 atomic per weight, read and written in DRAM at worst
        acts = rows * (n_in + n_out) * a
        return acts + weights * 8 + tables, acts + weights * a, flops
    raise ValueError(kernel)


PAIRS = (("bf16", "act"), ("bf16", "int8"), ("bf16", "int4"), ("fp32", "act"), ("tf32", "act"))
"""(activation dtype, z storage) rows of the model: z in the activation dtype, packed z for inference."""


def model(n_in: int = 4096, n_out: int = 4096) -> list[dict]:
    """One row per (kernel, tier, dtype, z storage, GPU): predicted times and the ratio ROAST / dense.
    ``step`` is a training step's three kernels (fwd, dX, dz) against nn.Linear's three GEMMs."""
    out = []
    for kernel in ("fwd", "grad_input", "grad_z", "step"):
        for tier in TIERS:
            rows = TIER_ROWS[tier]
            for dtype, zstore in PAIRS:
                if kernel in ("grad_z", "step") and zstore != "act":
                    continue  # a packed z is no parameter: it has no gradient
                parts = ("fwd", "grad_input", "grad_z") if kernel == "step" else (kernel,)
                costs = [traffic(part, rows, n_in, n_out, dtype, zstore) for part in parts]
                for gpu in GPUS:
                    t_roast = sum(max(b / gpu.bandwidth, f / _peak(gpu, dtype, True)) for b, _, f in costs)
                    t_dense = sum(max(d / gpu.bandwidth, f / _peak(gpu, dtype, False)) for _, d, f in costs)
                    memory = all(b / gpu.bandwidth >= f / _peak(gpu, dtype, True) for b, _, f in costs)
                    out.append(
                        dict(
                            kernel=kernel,
                            tier=tier,
                            rows=rows,
                            dtype=dtype,
                            zstore=zstore,
                            gpu=gpu.name,
                            roast_us=t_roast * 1e6,
                            dense_us=t_dense * 1e6,
                            ratio=t_roast / t_dense,
                            bound="memory" if memory else "math",
                        )  # fmt: skip
                    )
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| kernel | tier (rows) | act | z | A100 ROAST / cuBLAS (us) | ratio | H100 ROAST / cuBLAS (us) | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["kernel"], r["tier"], r["rows"], r["dtype"], r["zstore"]), {})[r["gpu"]] = r
    for (kernel, tier, n, dtype, zstore), gpus in by_key.items():
        cells = []
        for gpu in GPUS:
            r = gpus[gpu.name]
            cells += [f"{r['roast_us']:.1f} / {r['dense_us']:.1f} ({r['bound']})", f"{r['ratio']:.2f}"]
        lines.append(f"| {kernel} | {tier} ({n}) | {dtype} | {zstore} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="n_in", type=int, default=4096)
    p.add_argument("--out", dest="n_out", type=int, default=4096)
    args = p.parse_args(argv)
    print(markdown(model(args.n_in, args.n_out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
