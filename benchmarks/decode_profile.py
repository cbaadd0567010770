"""``python -m benchmarks.decode_profile``: where an eager decode token of hf-roast goes on CPU.

``hf-roast bench --generate`` gives the end-to-end decode speed; this splits one greedy decode token of the
compressed model into the time inside the C++ hashed GEMV's op (every compressed projection), the time of the dense
output layer (SmolLM2 ties it to the embeddings, so it stays dense), and the rest (attention, norms, the
Python of each layer call). Per arm: the difference between generating ``--new-tokens`` and 1 token, divided
by the tokens, median of ``--rounds``, the arms interleaved round by round.

    python -m benchmarks.decode_profile                       # SmolLM2-135M (pinned wheel), 16x, fp32 z
    python -m benchmarks.decode_profile --compressions 4,16 --z-bits 8 --threads 2
    python -m benchmarks.decode_profile --model tiny          # a small random Llama (smoke test)
    python -m benchmarks.decode_profile --compile --threads 2 # compiled, static cache: where the token goes

With ``--compile`` each arm's forward runs under ``torch.compile`` with a static KV cache (as ``hf-roast bench
--generate --compile`` runs it), and the torch profiler splits a token further: the CPU path's op
``hf_roast::roast_linear_cpu`` (its C++ GEMV, called from the compiled graph), dynamo's guard evaluation before
each call of the compiled forward, the compiled graph's own Python wrapper, and the output layer (the matrix
products whose output is as wide as the vocabulary). The profiler adds its own cost; the split, not the total, is
the reading.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch

from hf_roast.backends.cpu import ops as cpu_ops


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.decode_profile", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", choices=("auto", "smollm2", "tiny"), default="auto")
    p.add_argument("--compressions", default="16", help="comma-separated hf-roast arms")
    p.add_argument(
        "--z-bits", default="", help="also these arms with z packed to 8 / 4 bits (comma-separated)"
    )
    p.add_argument("--new-tokens", type=int, default=33)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compiled forward and static cache, split by the torch profiler",
    )
    return p.parse_args(argv)


class Clock:
    """Seconds spent inside the GEMV and inside the output layer, and the GEMV's calls, since the last reset."""

    def __init__(self) -> None:
        self.gemv = self.head = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.gemv = self.head = 0.0
        self.calls = 0


def instrument(clock: Clock) -> Callable[[], None]:
    """Time every eager call of the CPU path's op (its GEMV, and the op dispatcher around it); returns the
    undo. A compiled graph calls the op without Python, so there the profiler times it instead."""
    real = cpu_ops.cpu_roast_linear

    def timed(*args):
        start = time.perf_counter()
        try:
            return real(*args)
        finally:
            clock.gemv += time.perf_counter() - start
            clock.calls += 1

    cpu_ops.cpu_roast_linear = timed

    def undo() -> None:
        cpu_ops.cpu_roast_linear = real

    return undo


def time_output_layer(model: torch.nn.Module, clock: Clock) -> None:
    head = model.get_output_embeddings()
    started: list[float] = []
    head.register_forward_pre_hook(lambda module, args: started.append(time.perf_counter()))

    def done(module, args, out):
        clock.head += time.perf_counter() - started.pop()

    head.register_forward_hook(done)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with torch.no_grad():  # not set_grad_enabled: a caller (a test) keeps its own autograd state
            (profile_compiled if args.compile else profile)(args)
    finally:
        torch.set_num_threads(threads)
    return 0


def profile(args: argparse.Namespace) -> None:
    from hf_roast.scripts.bench_generate import PROMPT_TOKENS, build_arms, load_model

    dense, description = load_model(args.model)
    arms = build_arms(dense, args.compressions, args.z_bits)
    clock = Clock()
    for model in arms.values():
        time_output_layer(model, clock)
    prompt = torch.randint(
        3, dense.config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0)
    )

    def generate(model, n: int) -> tuple[float, float, float, int]:
        clock.reset()
        start = time.perf_counter()
        model.generate(
            prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        return time.perf_counter() - start, clock.gemv, clock.head, clock.calls

    undo = instrument(clock)
    try:
        for model in arms.values():
            generate(model, 4)  # warm-up: library load, allocator
        per_token: dict[str, list[tuple[float, ...]]] = {name: [] for name in arms}
        n = args.new_tokens - 1
        for _ in range(args.rounds):
            for name, model in arms.items():
                long, short = generate(model, args.new_tokens), generate(model, 1)
                per_token[name].append(tuple((a - b) / n for a, b in zip(long, short)))
    finally:
        undo()
    print(
        f"{description}; {torch.get_num_threads()} threads; ms per decode token, medians of {args.rounds} rounds"
    )
    print(f"{'arm':<22} {'token':>7} {'tok/s':>6} {'GEMV':>7} {'calls':>6} {'output layer':>13} {'rest':>7}")
    for name, rows in per_token.items():
        token, gemv, head, calls = (statistics.median(v) for v in zip(*rows))
        rest = token - gemv - head
        print(
            f"{name:<22} {token * 1e3:7.1f} {1 / token:6.1f} {gemv * 1e3:7.1f} {calls:6.0f} {head * 1e3:13.1f} "
            f"{rest * 1e3:7.1f}"
        )


COMPILED_PARTS = ("GEMV op", "guards", "graph wrapper", "output layer")


def compiled_split(events, vocab: int) -> dict[str, float]:
    """Seconds of a profiled run by part (see the module docstring); ``events`` are the profiler's averages
    with input shapes recorded."""
    split = dict.fromkeys(COMPILED_PARTS, 0.0)
    for e in events:
        if e.key == "hf_roast::roast_linear_cpu":
            split["GEMV op"] += e.cpu_time_total / 1e6
        elif e.key == "TorchDynamo Cache Lookup":
            split["guards"] += e.self_cpu_time_total / 1e6
        elif e.key.startswith("## Call CompiledFxGraph"):
            split["graph wrapper"] += e.self_cpu_time_total / 1e6
        elif e.key in ("aten::mm", "aten::addmm") and any(vocab in shape for shape in e.input_shapes or []):
            split["output layer"] += e.self_cpu_time_total / 1e6
    return split


def profile_compiled(args: argparse.Namespace) -> None:
    from hf_roast.scripts.bench_generate import (
        PROMPT_TOKENS,
        _transformers_model,
        build_arms,
        compiled_forward,
        load_model,
    )

    dense, description = load_model(args.model)
    arms = build_arms(dense, args.compressions, args.z_bits)
    vocab = dense.config.vocab_size
    prompt = torch.randint(3, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    compiled = {name: torch.compile(_transformers_model(m).forward) for name, m in arms.items()}

    def run(name: str, n: int, profiled: bool):
        profiler = torch.profiler.profile(record_shapes=True) if profiled else contextlib.nullcontext()
        with compiled_forward(arms[name], compiled[name]), profiler:
            start = time.perf_counter()
            arms[name].generate(
                prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
                cache_implementation="static",
            )  # fmt: skip
            seconds = time.perf_counter() - start
        if not profiled:
            return seconds
        return compiled_split(profiler.key_averages(group_by_input_shape=True), vocab)

    for name in arms:  # compiles every shape the rounds use (untimed)
        run(name, args.new_tokens, False)
        run(name, 1, False)
    n = args.new_tokens - 1
    token: dict[str, list[float]] = {name: [] for name in arms}
    parts: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name in arms:
            token[name].append((run(name, args.new_tokens, False) - run(name, 1, False)) / n)
            long, short = run(name, args.new_tokens, True), run(name, 1, True)
            parts[name].append({k: (long[k] - short[k]) / n for k in COMPILED_PARTS})
    print(
        f"{description}; {torch.get_num_threads()} threads; compiled, static cache; ms per decode token, medians "
        f"of {args.rounds} rounds (token: unprofiled; the parts: profiled)"
    )
    header = f"{'arm':<22} {'token':>7} {'tok/s':>6} " + " ".join(f"{p:>15}" for p in COMPILED_PARTS)
    print(header)
    for name in arms:
        t = statistics.median(token[name])
        cells = " ".join(
            f"{statistics.median(d[p] for d in parts[name]) * 1e3:15.1f}" for p in COMPILED_PARTS
        )
        print(f"{name:<22} {t * 1e3:7.1f} {1 / t:6.1f} {cells}")


if __name__ == "__main__":
    raise SystemExit(main())
