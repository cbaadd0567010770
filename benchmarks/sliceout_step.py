"""``python -m benchmarks.sliceout_step``: the training step's time with SliceOut at keep 1, 0.75 and 0.5.

Builds the from-scratch experiment's byte-level Llama (4 layers, width 256, MLP 688, heads of 32; hf-roast on
its projections, ``benchmarks/harness/scratch.py``) once per setting, from the same seed, and times the whole
training step (forward, backward, gradient clipping, AdamW) on random byte batches: the median of ``--steps``
steps after ``--warmup`` untimed ones, side by side in one run, with each setting's ratio to keep 1 and its peak
memory (CUDA: the allocator's peak over the timed steps; CPU: the process's peak RSS so far, which only grows,
so read it for the first row only).

    python -m benchmarks.sliceout_step                    # the default model, 20 timed steps per setting
    python -m benchmarks.sliceout_step --device cuda --steps 50 --json sliceout_step.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch

SETTINGS = ((1.0, "random"), (0.75, "random"), (0.75, "contiguous"), (0.5, "random"), (0.5, "contiguous"))
"""(keep, mode) of every row; keep 1 is the model without SliceOut."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sliceout_step", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--steps", type=int, default=20, help="Timed steps per setting (the median is reported).")
    p.add_argument(
        "--warmup", type=int, default=3, help="Untimed steps first (allocator, kernels' autotuning)."
    )
    p.add_argument("--compression", type=float, default=16.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--tile", type=int, nargs=2, default=(32, 32))
    p.add_argument("--json", help="Also write the rows to this file.")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0.")
    return args


def build(args: argparse.Namespace, keep: float, mode: str) -> torch.nn.Module:
    """The scratch experiment's hf-roast model at ``keep`` (seeded: every setting starts from the same z)."""
    from hf_roast.sliceout import enable_sliceout

    from .harness.arms import Arm
    from .harness.scratch import ScratchSetup, build_scratch_model

    setup = ScratchSetup(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        head_dim=args.head_dim,
        context=args.context,
        batch_size=args.batch_size,
    )
    arm = Arm(name="sliceout", method="roast", compression=args.compression, tile=tuple(args.tile))
    model, _ = build_scratch_model(arm, setup)
    if keep < 1.0:
        enable_sliceout(model, keep, mode, seed=0)
    return model.to(args.device).train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    """Median and spread of the training step's wall time, and the peak memory."""
    from .harness.scratch import BYTE_VOCAB

    device = torch.device(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    times = []
    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, BYTE_VOCAB, (args.batch_size, args.context), generator=generator).to(device)
        if i == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "peak_mib": peak / 2**20,
        "final_loss": float(loss.detach()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for keep, mode in SETTINGS:
        torch.manual_seed(0)
        model = build(args, keep, mode)
        row = {"keep": keep, "mode": mode if keep < 1.0 else "-", **time_steps(model, args)}
        rows.append(row)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    base = rows[0]["median_ms"]
    memory = "CUDA peak allocated" if args.device.startswith("cuda") else "process peak RSS"
    print(
        f"SliceOut training step: {args.layers} layers, width {args.hidden}, MLP {args.intermediate}, "
        f"{args.compression:g}x, batch {args.batch_size} x {args.context}, {args.device}, median of {args.steps}"
    )
    print(f"{'keep':>5} {'mode':>10} {'median ms':>10} {'min ms':>8} {'vs keep 1':>9} {memory + ' MiB':>26}")
    for row in rows:
        row["ratio"] = row["median_ms"] / base
        print(
            f"{row['keep']:>5g} {row['mode']:>10} {row['median_ms']:>10.2f} {row['min_ms']:>8.2f} "
            f"{row['ratio']:>9.3f} {row['peak_mib']:>26.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
