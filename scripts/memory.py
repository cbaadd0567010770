"""Training memory and speed: a dense Llama against the same Llama compressed by hf-roast, side by side.

Builds a Llama-architecture causal LM from a config (no download; the default has 134M dense
parameters: width 768, 12 layers, MLP 2048, vocabulary 32000, untied embeddings), trains it a few
AdamW steps on random tokens, dense and with hf-roast, and prints for each arm:

- the bytes of parameters, of gradients and of the optimizer state (counted tensor by tensor);
- the peak resident memory (RSS) while training: the high-water mark is reset after the model is built,
  so it covers the training steps only, and the whole process's peak (model building included) next to it;
- the median step time (forward + backward + optimizer step) after one warm-up step.

Each arm runs in its own subprocess, one after the other, so their peaks are not shared and the same
threads serve both. The hf-roast arm compresses every linear layer, the output layer included, and the
input embeddings (``--dense-lm-head`` keeps the output layer dense, the default "all-linear" target).

    hf-roast memory                               # 16x, 3 timed steps, batch 4 x 128 tokens, 1 thread
    hf-roast memory --compression 32 --steps 5 --threads 2
    hf-roast memory --gradient-checkpointing      # both arms recompute activations in backward
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

ARMS = ("dense", "hf-roast")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="hf-roast memory", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--compression", type=float, default=16.0)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each arm")
    p.add_argument(
        "--dense-lm-head", action="store_true", help="keep the output layer dense in the hf-roast arm"
    )
    p.add_argument(
        "--mmap-threshold-kib",
        type=int,
        default=256,
        help="glibc's fixed mmap threshold in each arm (MALLOC_MMAP_THRESHOLD_); 0 keeps glibc's dynamic "
        "default, whose retained heap makes peak RSS vary by hundreds of MiB between identical runs",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each decoder layer's activations in backward (both arms; use_reentrant=False)",
    )
    p.add_argument("--json", default=None, help="also write both arms' figures to this file")
    p.add_argument("--arm", choices=ARMS, default=None, help=argparse.SUPPRESS)  # one arm, in a subprocess
    return p.parse_args(argv)


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _reset_peak_rss() -> None:
    """Reset the process's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def run_arm(args: argparse.Namespace) -> dict:
    """Build, train and measure one arm in this process."""
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_roast import RoastConfig, get_roast_model
    from hf_roast.backends.pytorch import clear_scratch

    torch.set_num_threads(args.threads)
    rss_imports = _status_kib("VmRSS")  # python + torch + transformers + hf_roast, before any model exists
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 128),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    dense_parameters = sum(p.numel() for p in model.parameters())
    if args.arm == "hf-roast":
        target = "all-linear" if args.dense_lm_head else r".*_proj|lm_head"
        model = get_roast_model(
            model,
            RoastConfig(compression=args.compression, compress_embeddings=True, target_modules=target),
        )
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    gc.collect()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rss_before = _status_kib("VmRSS")
    _reset_peak_rss()
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    params = [p for p in model.parameters()]
    result = {
        "arm": args.arm,
        "dense_parameters": dense_parameters,
        "stored_parameters": sum(p.numel() for p in {id(p): p for p in params}.values()),
        "param_bytes": _tensor_bytes(params),
        "grad_bytes": _tensor_bytes(p.grad for p in params),
        "optimizer_bytes": _tensor_bytes(
            t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
        ),
        "rss_after_imports_mib": rss_imports / 1024,
        "rss_before_training_mib": rss_before / 1024,
        "peak_training_rss_mib": _status_kib("VmHWM") / 1024,
        "peak_process_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": statistics.median(times[1:]),
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "final_loss": loss.item(),
    }
    clear_scratch()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.arm is not None:
        print("RESULT " + json.dumps(run_arm(args)), flush=True)
        return 0
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("hf-roast memory reads and resets the RSS high-water mark in /proc: it needs Linux.")
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--json")]
    if args.json:
        forwarded = [a for a in forwarded if a != args.json]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.mmap_threshold_kib:
        # glibc raises its mmap threshold dynamically (up to 32 MiB) after a large free, so buffers below it
        # then come from the heap and stay resident after free: the peak RSS of identical runs varied by
        # ~600 MiB here. A fixed threshold returns every large buffer to the OS; both arms get the same.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold_kib * 1024)
    results = {}
    for arm in ARMS:
        print(f"running the {arm} arm ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "hf_roast.scripts.memory", *forwarded, "--arm", arm],
            env=env,
            capture_output=True,
            text=True,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"the {arm} arm failed (exit code {proc.returncode})")
        results[arm] = json.loads(lines[-1][len("RESULT ") :])
    print(format_table(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


def format_table(results: dict, args: argparse.Namespace) -> str:
    dense, roast = results["dense"], results["hf-roast"]
    mib = 1024 * 1024
    state = lambda r: r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]  # noqa: E731
    above = lambda r: r["peak_training_rss_mib"] - r["rss_after_imports_mib"]  # noqa: E731
    rows = [
        ("stored parameters", f"{dense['stored_parameters']:,}", f"{roast['stored_parameters']:,}", 1),
        ("parameter MiB", dense["param_bytes"] / mib, roast["param_bytes"] / mib, None),
        ("gradient MiB", dense["grad_bytes"] / mib, roast["grad_bytes"] / mib, None),
        ("optimizer state MiB", dense["optimizer_bytes"] / mib, roast["optimizer_bytes"] / mib, None),
        ("params + grads + optimizer MiB", state(dense) / mib, state(roast) / mib, None),
        ("RSS after imports MiB", dense["rss_after_imports_mib"], roast["rss_after_imports_mib"], None),
        ("RSS before training MiB", dense["rss_before_training_mib"], roast["rss_before_training_mib"], None),
        ("peak training RSS MiB", dense["peak_training_rss_mib"], roast["peak_training_rss_mib"], None),
        ("  same, above the imports MiB", above(dense), above(roast), None),
        ("peak process RSS MiB", dense["peak_process_rss_mib"], roast["peak_process_rss_mib"], None),
        ("step time s", dense["step_s"], roast["step_s"], None),
    ]
    lm_head = "dense" if args.dense_lm_head else "compressed"
    lines = [
        f"Llama {dense['dense_parameters'] / 1e6:.1f}M dense parameters (width {args.hidden}, {args.layers} layers, "
        f"MLP {args.intermediate}, vocabulary {args.vocab}); AdamW; batch {args.batch} x {args.seq} tokens; "
        f"{args.threads} thread(s); median of {args.steps} steps after 1 warm-up; glibc mmap threshold "
        f"{f'{args.mmap_threshold_kib} KiB' if args.mmap_threshold_kib else 'dynamic (default)'}.",
        f"hf-roast: {args.compression:g}x, projections + input embeddings compressed, output layer {lm_head}.",
        "",
        f"| {'':<32} | {'dense':>14} | {'hf-roast':>14} | {'dense / hf-roast':>16} |",
        f"| {'-' * 32} | {'-' * 14}:| {'-' * 14}:| {'-' * 16}:|",
    ]
    for name, d, r, _ in rows:
        if isinstance(d, str):
            ratio = dense["stored_parameters"] / roast["stored_parameters"]
            lines.append(f"| {name:<32} | {d:>14} | {r:>14} | {ratio:>15.2f}x |")
        else:
            digits = 3 if name.startswith("step") else 1
            lines.append(f"| {name:<32} | {d:>14.{digits}f} | {r:>14.{digits}f} | {d / r:>15.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
