"""``python -m benchmarks.grad_probe``: how unevenly the compressed modules pull on the shared z (why ``module_balance``).

Builds the from-scratch experiment's byte-level Llama (4 layers, width 256) with hf-roast on its projections,
trains it a few steps with the split-rate recipe (README, "From scratch"), and prints the RMS of each module's
own dz over the slots it touches (:func:`hf_roast.balance.module_gradients`), at init and after training, on
held-out batches. Under Adam, a slot of z steps for the largest of the gradients summed into it.

    python -m benchmarks.grad_probe --compression 8 --steps 150
    python -m benchmarks.grad_probe --compression 8 --steps 150 --module-balance
"""

from __future__ import annotations

import argparse
import json
import statistics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grad_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--compression", type=float, default=8.0)
    p.add_argument("--steps", type=int, default=150, help="Training steps between the two measurements.")
    p.add_argument(
        "--lr", type=float, default=1e-3, help="z's rate in weight units; the rest trains at 1e-2."
    )
    p.add_argument(
        "--module-balance", action="store_true", help="Train with RoastConfig(module_balance=True)."
    )
    p.add_argument("--batches", type=int, default=4, help="Held-out batches each measurement averages over.")
    p.add_argument("--tiny", action="store_true", help="Template text instead of Wikipedia (for tests).")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="Also write the table to this JSON file.")
    return p.parse_args(argv)


def gradient_rms(model, stream, setup, batches: int) -> dict[str, float]:
    """Per module: RMS of its own dz over its nonzero slots, averaged over ``batches`` held-out windows."""
    from benchmarks.harness.scratch import training_windows
    from hf_roast.balance import module_gradients, slot_mean_square

    window = training_windows(stream, setup)
    sums: dict[str, list[float]] = {}
    for i in range(batches):
        ids = window(10_000 + i)[:, :-1]
        parts = module_gradients(model, lambda ids=ids: model(input_ids=ids, labels=ids).loss)
        for name, dz in parts.items():
            sums.setdefault(name, []).append(float(slot_mean_square(dz)) ** 0.5)
    return {name: statistics.fmean(v) for name, v in sums.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from benchmarks.harness.arms import Arm
    from benchmarks.harness.scratch import (
        ScratchSetup,
        build_scratch_model,
        tiny_bytes_source,
        train_from_scratch,
        training_windows,
        wikipedia_bytes_source,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    setup = ScratchSetup(steps=args.steps)
    source = tiny_bytes_source() if args.tiny else wikipedia_bytes_source()
    arm = Arm(
        "grad-probe",
        "roast",
        args.compression,
        rest_lr=1e-2,
        steps=args.steps,
        module_balance=args.module_balance,
    )
    model, _ = build_scratch_model(arm, setup)
    before = gradient_rms(model, source.val, setup, args.batches)
    train_from_scratch(model, setup, args.lr, training_windows(source.train, setup), rest_lr=1e-2)
    after = gradient_rms(model, source.val, setup, args.batches)
    rows = sorted(after, key=after.get)
    print(f"{'module':42s} {'dz RMS at init':>15s} {f'after {args.steps} steps':>17s}")
    for name in rows:
        print(f"{name:42s} {before[name]:15.2e} {after[name]:17.2e}")
    spread = max(after.values()) / min(after.values())
    print(f"largest / smallest after training: {spread:.0f}x (module_balance={args.module_balance})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "init": before, "trained": after}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
