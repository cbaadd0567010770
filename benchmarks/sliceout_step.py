"""``python -m benchmarks.sliceout_step``: the training step's time with SliceOut at keep 1, 0.75 and 0.5.

Builds the from-scratch experiment's byte-level Llama (4 layers, width 256, MLP 688, heads of 32; hf-roast on
its projections, ``benchmarks/harness/scratch.py``) once per setting, from the same seed, and times the whole
training step (forward, backward, gradient clipping, AdamW) on random byte batches: the median of ``--steps``
steps after ``--warmup`` untimed ones, the settings interleaved step by step in one run (a change of load moves
them alike), with each setting's ratio to keep 1 and its memory (CUDA: what one step allocates at its peak beyond the
model and optimizer state; CPU: the process's peak RSS, the same for every row).

    python -m benchmarks.sliceout_step                    # the default model, 20 timed steps per setting
    python -m benchmarks.sliceout_step --device cuda --steps 50 --json sliceout_step.json
    python -m benchmarks.sliceout_step --model minilm --batch-size 32 --context 64   # the fine-tuning experiment's step

``--model minilm``: the pinned all-MiniLM-L6-v2 with a 2-class head, compressed like the fine-tuning experiment's
hf-roast arms (``harness.arms.roast_config_for``; plain least-squares init), on random token batches of
``--batch-size`` x ``--context`` with random labels (``--hidden`` and the other shape options do not apply).
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
    p.add_argument("--model", choices=("scratch", "minilm"), default="scratch")
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
    """The experiment's hf-roast model at ``keep`` (seeded: every setting starts from the same z)."""
    from hf_roast.sliceout import enable_sliceout

    from .harness.arms import Arm
    from .harness.scratch import ScratchSetup, build_scratch_model

    if args.model == "minilm":
        from hf_roast.scripts.pinned_models import minilm_dir
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        from hf_roast import get_roast_model

        from .harness.arms import roast_config_for

        hf_logging.set_verbosity_error()  # the new classifier head is reported missing, as expected
        arm = Arm(name="sliceout", method="roast", compression=args.compression, tile=tuple(args.tile))
        dense = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
        model = get_roast_model(dense, roast_config_for(arm))
        if keep < 1.0:
            enable_sliceout(model, keep, mode, seed=0)
        return model.to(args.device).train()

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


class _Stepper:
    """One setting's model, optimizer and batches: :meth:`step` times one whole training step."""

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace):
        self.model, self.args = model, args
        self.device = torch.device(args.device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.generator = torch.Generator().manual_seed(0)  # every setting sees the same batches
        self.loss = float("nan")

    def batch(self) -> dict[str, torch.Tensor]:
        """Random inputs of the model's task: bytes with themselves as LM labels, or tokens and 2-class labels."""
        from .harness.scratch import BYTE_VOCAB

        args, g = self.args, self.generator
        if args.model == "minilm":
            vocab = self.model.config.vocab_size
            ids = torch.randint(1000, vocab, (args.batch_size, args.context), generator=g)
            labels = torch.randint(0, 2, (args.batch_size,), generator=g)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        else:
            ids = torch.randint(0, BYTE_VOCAB, (args.batch_size, args.context), generator=g)
            batch = {"input_ids": ids, "labels": ids}
        return {k: v.to(self.device) for k, v in batch.items()}

    def step(self) -> float:
        batch = self.batch()
        _sync(self.device)
        start = time.perf_counter()
        loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        self.loss = float(loss.detach())
        return time.perf_counter() - start


def time_interleaved(steppers: list[_Stepper], args: argparse.Namespace) -> list[dict]:
    """Every setting's step in turn, round after round (keep 1, 0.75, ..., keep 1, ...), so that a change of
    machine load during the run moves every setting alike; medians and spreads of each setting's steps."""
    times: list[list[float]] = [[] for _ in steppers]
    for i in range(args.warmup + args.steps):
        for k, stepper in enumerate(steppers):
            elapsed = stepper.step()
            if i >= args.warmup:
                times[k].append(elapsed)
    return [
        {
            "median_ms": 1e3 * statistics.median(t),
            "min_ms": 1e3 * min(t),
            "max_ms": 1e3 * max(t),
            "peak_mib": _step_peak(stepper) / 2**20,
            "final_loss": stepper.loss,
        }
        for t, stepper in zip(times, steppers)
    ]


def _step_peak(stepper: _Stepper) -> float:
    """CUDA: what one more step of this setting allocates at its peak beyond what is already held (activations,
    gradients, optimizer temporaries), so settings compare although they share the process. CPU: the process's
    peak RSS, the same for every row (the allocator keeps no per-setting peak)."""
    device = stepper.device
    if device.type != "cuda":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    stepper.step()
    return torch.cuda.max_memory_allocated(device) - held


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steppers = []
    for keep, mode in SETTINGS:
        torch.manual_seed(0)
        steppers.append(_Stepper(build(args, keep, mode), args))
    measured = time_interleaved(steppers, args)
    rows = [
        {"keep": keep, "mode": mode if keep < 1.0 else "-", **m}
        for (keep, mode), m in zip(SETTINGS, measured)
    ]
    base = rows[0]["median_ms"]
    memory = "CUDA step peak" if args.device.startswith("cuda") else "process peak RSS"
    shape = (
        "all-MiniLM-L6-v2 classifier"
        if args.model == "minilm"
        else f"{args.layers} layers, width {args.hidden}, MLP {args.intermediate}"
    )
    print(
        f"SliceOut training step: {shape}, {args.compression:g}x, batch {args.batch_size} x {args.context}, "
        f"{args.device}, median of {args.steps}"
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
