"""``python -m benchmarks.evaluate``: the memory-accuracy frontier of hf-roast against pruning and smaller models.

Runs the named experiments arm by arm, writes each arm's JSON as soon as it finishes (a rerun skips
finished arms, so an interrupted sweep resumes), then aggregates everything into ``results.json``,
``results.md`` and one PNG per experiment in the results folder.

    python -m benchmarks.evaluate                      # default sweep, real models (hours on 2 cores; resumable)
    python -m benchmarks.evaluate --quick              # the headline arms in at most 40 minutes on 2 cores
    python -m benchmarks.evaluate --full               # every arm, with seeds, mappers and recovery variants
    python -m benchmarks.evaluate --tiny               # tiny synthetic models and text, seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

EXPERIMENT_DIRS = {
    "classification": "classification",
    "lm": "language_model",
    "scratch": "scratch",
    "scratch-high": "scratch_high",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--experiments", nargs="+", choices=list(EXPERIMENT_DIRS), default=["classification", "scratch"]
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="Run every arm, not only the default sweep.")
    mode.add_argument(
        "--tiny", action="store_true", help="Tiny config models and synthetic text (smoke test)."
    )
    mode.add_argument("--quick", action="store_true", help="The headline arms only (at most 40 min).")
    p.add_argument(
        "--output", default="benchmarks/results", help="Results folder (default: benchmarks/results)."
    )
    p.add_argument("--arms", nargs="+", default=None, help="Run only these arm names.")
    p.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="Rotten Tomatoes train subsample (same for all arms; default: the whole training split).",
    )
    p.add_argument("--val-size", type=int, default=1000, help="Validation examples carved from train.")
    p.add_argument("--epochs", type=float, default=1.0, help="Base epochs of the classification recipe.")
    p.add_argument(
        "--lr-grid", type=float, nargs="+", default=[1e-4, 3e-4], help="Learning rates tried per arm."
    )
    p.add_argument(
        "--scratch-batch", type=int, default=8, help="From-scratch LM batch (windows of 128 bytes)."
    )
    p.add_argument("--recovery-steps", type=int, default=10, help="LM recovery fine-tune steps (every arm).")
    p.add_argument("--eval-tokens", type=int, default=4096, help="Held-out tokens for LM perplexity.")
    p.add_argument(
        "--recovery-batch", type=int, default=2, help="LM recovery batch (sequences of 256 tokens)."
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)."
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="Language model: where the arms run (e.g. cuda; fp32 with TF32 matrix products there).",
    )
    p.add_argument("--rerun", action="store_true", help="Recompute arms whose results exist.")
    p.add_argument(
        "--rates-per-pass",
        type=int,
        default=None,
        help="From scratch, breadth first: each pass trains at most this many new rates per arm (the first rates "
        "of its grid), and passes repeat until every grid is done.",
    )
    p.add_argument(
        "--rate-from-partial",
        action="store_true",
        help="From scratch: a second seed whose grid_from arm is unfinished takes the best rate that arm has "
        "finished so far (recorded in the result and flagged in the report) instead of waiting for it.",
    )
    p.add_argument("--summary-only", action="store_true", help="Only rebuild results.json / .md / .png.")
    return p.parse_args(argv)


def hardware() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, torch threads {threads}, {gpu}"


def _reuse_base_lr(arm, folder: Path):
    """Distilled / longer-schedule arms reuse the learning rate chosen for the same arm at base settings."""
    from dataclasses import replace

    if arm.lrs or not (arm.distill or arm.schedule != 1.0):
        return arm
    base = re.sub(r"(-kdh?\d*)?(-sched\d+)?$", "", arm.name)
    path = folder / f"{base}.json"
    if path.is_file():
        return replace(arm, lrs=(json.loads(path.read_text())["selected_lr"],))
    return arm


def _reuse_recovery_lr(arm, folder: Path):
    """A recovered LM arm without rates takes the rate its ``grid_from`` arm chose (by distillation loss)."""
    from dataclasses import replace

    if arm.lrs or not arm.grid_from:
        return arm
    path = folder / f"{arm.grid_from}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{arm.name} takes its recovery rate from {arm.grid_from}: run that arm first."
        )
    return replace(arm, lrs=(json.loads(path.read_text())["selected_lr"],))


def _reuse_method_lr(arm, folder: Path, mode: str, partial_ok: bool = False):
    """From-scratch arms without a grid take their rate from their method's grid arm (same protocol): the grid
    at the arm's own compression where there is one (a longer budget, another seed or mapper), else the grid at
    8x (or dense's). An arm of the same budget takes the rate the grid chose; an arm of a longer budget searches
    the grid's two best rates on validation, because the best rate of a short run is not always the best of a
    long one (pruning at 16x: 3e-2 after 300 steps, 1e-2 after 1,200). See ``scratch_arms``."""

    from benchmarks.harness.experiments import scratch_arms

    if arm.lrs:
        return arm
    if arm.grid_from:
        return _rates_of(arm, folder / f"{arm.grid_from}.json", arm.grid_from, None, partial_ok)
    key = (arm.method, arm.rest_lr, arm.module_balance)
    grid_arms = [
        a
        for _, a in scratch_arms(mode)
        if a.lrs and len(a.lrs) > 1 and (a.method, a.rest_lr, a.module_balance) == key
    ]
    source = next((a for a in grid_arms if a.compression == arm.compression), None) or next(
        (a for a in grid_arms if a.compression in (1.0, 8.0)), None
    )
    path = folder / f"{source.name}.json" if source else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{arm.name} reuses the learning rate chosen by its method's grid arm "
            f"{source.name if source else '?'}: run that arm first (it comes first in the default order)."
        )
    return _rates_of(arm, path, source.name, source.steps)


def _rates_of(arm, path: Path, source: str, steps_of_grid: int | None, partial_ok: bool = False):
    """The grid's choice on the same budget, else its two best rates on validation.

    With ``partial_ok`` an arm of the same budget (another seed) whose source is unfinished takes the best rate
    on validation among those the source finished, and records so (``Arm.rate_from_partial``): a second seed
    can start before the first seed's second rate has trained."""
    from dataclasses import replace

    if not path.is_file():
        raise FileNotFoundError(f"{arm.name} takes its learning rate from {source}: run that arm first.")
    chosen = json.loads(path.read_text())
    if steps_of_grid is None:
        steps_of_grid = chosen["setup"]["steps"]
    if chosen.get("complete") is False:
        same_budget = (arm.steps or 0) <= (steps_of_grid or 0)
        if not (partial_ok and same_budget):
            raise FileNotFoundError(f"{arm.name} takes its learning rate from {source}, which is unfinished.")
        done = len([r for r in chosen["lr_search"] if not r.get("diverged")])
        of = len(chosen["arm"]["lrs"] or ())
        return replace(arm, lrs=(chosen["selected_lr"],), rate_from_partial=f"{done} of {of} rates")
    if (arm.steps or 0) <= (steps_of_grid or 0):
        return replace(arm, lrs=(chosen["selected_lr"],))
    runs = [r for r in chosen["lr_search"] if not r.get("diverged")]
    best_two = sorted(runs, key=lambda r: r["val_bits_per_byte"])[:2]
    # best first: a breadth-first sweep (--rates-per-pass 1) trains every long arm's likeliest rate first
    return replace(arm, lrs=tuple(r["lr"] for r in best_two))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm.auto import tqdm

    from benchmarks.harness import experiments, results

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    mode = "tiny" if args.tiny else ("full" if args.full else ("quick" if args.quick else "default"))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "mode": mode,
        "command": "python -m benchmarks.evaluate " + " ".join(sys.argv[1:] if argv is None else argv),
        "hardware": hardware(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if not args.summary_only:
        steps = 2 if mode == "tiny" else args.recovery_steps
        queue = experiments.run_order(args.experiments, mode, steps)
        if args.arms:
            queue = [(e, a) for e, a in queue if a.name in args.arms]
        # a from-scratch arm's grid depends on its method's grid arm, so whether it is up to date is
        # decided when it comes up (run_queue); the others are done once their file exists
        todo = [
            (e, a)
            for e, a in queue
            if args.rerun
            or e.startswith("scratch")
            or not results.arm_path(out, EXPERIMENT_DIRS[e], a.name).is_file()
        ]
        while _run_queue(todo, mode, args, out, tqdm, results) and args.rates_per_pass:
            todo = [(e, a) for e, a in todo if e.startswith("scratch")]  # the others finished in pass one
    results.write_summary(out, meta)
    from benchmarks.harness import scratch_high

    scratch_high.write(out)
    print(f"results written to {out}/results.md")
    return 0


def _run_queue(todo, mode: str, args, out: Path, tqdm, results) -> bool:
    """Run every arm of ``todo`` once; True when anything was trained."""
    import torch

    progressed = False
    prepared: dict[str, tuple] = {}
    teacher = None
    bar = tqdm(todo, desc="evaluate", unit="arm")
    for experiment, arm in bar:
        bar.set_postfix_str(f"{experiment}/{arm.name}")
        folder = out / EXPERIMENT_DIRS[experiment]
        if experiment not in prepared:
            prepared[experiment] = _prepare(experiment, mode, args)
        source, setup, cache = prepared[experiment]
        t0 = time.perf_counter()
        if experiment == "classification":
            from benchmarks.harness.classification import run_classification_arm

            arm = _reuse_base_lr(arm, folder)
            if arm.distill and teacher is None:
                teacher = _load_teacher(source, folder)
            result, model = run_classification_arm(arm, source, setup, teacher)
            if arm.name == "dense":  # the teacher of the distillation arms (not a second seed or schedule)
                teacher = model
                _save_teacher(model, folder)
            metric = f"test acc {100 * result['test_accuracy']:.2f}% (lr {result['selected_lr']:g})"
        elif experiment in ("scratch", "scratch-high"):
            from benchmarks.harness.scratch import run_scratch_arm, up_to_date

            try:
                arm = _reuse_method_lr(arm, folder, mode, args.rate_from_partial)
            except FileNotFoundError as missing:
                if experiment == "scratch":
                    raise
                # its grid arm is unfinished (another worker's, or later in this queue): a later run takes it
                tqdm.write(f"[{experiment}] {arm.name}: skipped, {missing}", file=sys.stdout)
                continue
            path = results.arm_path(out, EXPERIMENT_DIRS[experiment], arm.name)
            previous = None if args.rerun or not path.is_file() else json.loads(path.read_text())
            if up_to_date(previous, arm, setup):
                continue

            def save_partial(partial, experiment=experiment):
                results.write_arm(
                    out, EXPERIMENT_DIRS[experiment], {**partial, "mode": mode, "complete": False}
                )

            result, model = run_scratch_arm(
                arm, source, setup, previous, on_run=save_partial, max_new_runs=args.rates_per_pass
            )
            metric = f"{result['bits_per_byte']:.3f} bits/byte (lr {result['selected_lr']:g})"
        else:
            from benchmarks.harness.language_model import run_lm_arm

            arm = _reuse_recovery_lr(arm, folder)
            result, model = run_lm_arm(arm, source, setup, cache)
            metric = f"ppl {result['perplexity']:.3f}"
        result["mode"] = mode
        result["torch_threads"] = torch.get_num_threads()
        results.write_arm(out, EXPERIMENT_DIRS[experiment], result)
        tqdm.write(
            f"[{experiment}] {arm.name}: {metric}, target {result['storage']['target_ratio']:.2f}x, "
            f"{time.perf_counter() - t0:.0f}s",
            file=sys.stdout,
        )
        sys.stdout.flush()
        del model
        progressed = True
    return progressed


def _prepare(experiment: str, mode: str, args):
    from benchmarks.harness import sources

    if experiment in ("scratch", "scratch-high"):
        from benchmarks.harness.scratch import ScratchSetup, tiny_bytes_source, wikipedia_bytes_source

        curve = 0
        if experiment == "scratch-high":
            from benchmarks.harness.experiments import HIGH_CURVE_EVERY

            curve = 4 if mode == "tiny" else HIGH_CURVE_EVERY

        if mode == "tiny":
            setup = ScratchSetup(
                hidden_size=32,
                intermediate_size=64,
                num_layers=2,
                head_dim=16,
                context=16,
                batch_size=4,
                val_bytes=256,
                eval_bytes=256,
                curve_every=curve,
            )
            return tiny_bytes_source(), setup, None
        setup = ScratchSetup(batch_size=args.scratch_batch, curve_every=curve)
        return wikipedia_bytes_source(), setup, None
    if experiment == "classification":
        from benchmarks.harness.classification import ClassificationSetup

        if mode == "tiny":
            source = sources.tiny_classification_source(n=64)
            setup = ClassificationSetup(epochs=1, batch_size=16, max_length=16, lr_grid=(1e-3, 3e-3))
        else:
            source = sources.minilm_classification_source(args.train_size, args.val_size)
            setup = ClassificationSetup(epochs=args.epochs, lr_grid=tuple(args.lr_grid))
        return source, setup, None
    from benchmarks.harness.language_model import LanguageModelSetup

    if mode == "tiny":
        setup = LanguageModelSetup(
            context=32,
            eval_tokens=128,
            train_context=16,
            recover_batch_size=4,
            recover_max_length=32,
            device=args.device,
        )
        return sources.tiny_lm_source(), setup, {}
    setup = LanguageModelSetup(
        eval_tokens=args.eval_tokens, train_batch_size=args.recovery_batch, device=args.device
    )
    return sources.smollm2_source(), setup, {}


def _teacher_path(folder: Path) -> Path:
    """The dense fine-tuned teacher lives in the gitignored cache, keyed by the results folder."""
    from benchmarks.harness.data import cache_dir

    key = str(folder.resolve()).strip("/").replace("/", "_")
    return cache_dir() / "teachers" / key / "dense.pt"


def _save_teacher(model, folder: Path) -> None:
    import torch

    path = _teacher_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)


def _load_teacher(source, folder: Path):
    import torch

    path = _teacher_path(folder)
    if not path.is_file():
        raise FileNotFoundError(
            f"Distillation needs the dense fine-tuned teacher at {path}: rerun the dense arm "
            "(python -m benchmarks.evaluate --arms dense --rerun)."
        )
    model = source.load_model(len(source.data.label_names))
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


if __name__ == "__main__":
    sys.exit(main())
