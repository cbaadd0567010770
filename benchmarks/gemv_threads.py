"""``python -m benchmarks.gemv_threads``: the CPU path's GEMV on one thread against two, per projection kind.

``PARALLEL_GRAIN`` (hf_roast/backends/cpu/build.py) decides how many threads a call of the hashed GEMV gets. This
times every projection of one kind (all q_proj, all k_proj, ...) of the 16x model on 1 and on 2 threads, the two
interleaved round by round in one process, with the cache flushed before each group as the dense output layer
flushes it in a real decode token. Per call, median of the rounds (the first two dropped). A kind whose work is
below the grain runs on one thread either way.

    python -m benchmarks.gemv_threads                 # SmolLM2-135M (pinned wheel), 16x, fp32 z
    python -m benchmarks.gemv_threads --model tiny    # a small random Llama (smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_roast.backends.cpu import ops as cpu_ops

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gemv_threads", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", choices=("auto", "smollm2", "tiny"), default="auto")
    p.add_argument("--compression", default="16")
    p.add_argument("--rounds", type=int, default=12)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    """Prints and returns, per projection kind, microseconds per call on (1 thread, 2 threads)."""
    from hf_roast.scripts.bench_generate import build_arms, load_model

    args = parse_args(argv)
    dense, description = load_model(args.model)
    model = list(build_arms(dense, args.compression, "").values())[-1]
    layers = dict(model.roast_layers())
    z = next(iter(layers.values())).roast_store.read_z()
    head = dense.get_output_embeddings().weight.detach()
    flush_input = torch.randn(1, head.shape[1])
    generator = torch.Generator().manual_seed(0)
    groups = {
        kind: [(layer, torch.randn(1, 1, layer.in_features, generator=generator))
               for name, layer in layers.items() if name.endswith(kind)]
        for kind in KINDS
    }  # fmt: skip
    groups = {kind: group for kind, group in groups.items() if group}
    times: dict[tuple[str, int], list[float]] = {(kind, t): [] for kind in groups for t in (1, 2)}
    threads = torch.get_num_threads()
    assert cpu_ops.unavailable_reason() is None, cpu_ops.unavailable_reason()
    try:
        with torch.no_grad():
            for _ in range(args.rounds):
                for t in (1, 2):
                    torch.set_num_threads(t)
                    for kind, group in groups.items():
                        torch.nn.functional.linear(flush_input, head)  # evicts z as the output layer does
                        start = time.perf_counter()
                        for layer, x in group:
                            cpu_ops.cpu_roast_linear(x, z, None, layer.layer_mapping())
                        times[(kind, t)].append((time.perf_counter() - start) / len(group) * 1e6)
    finally:
        torch.set_num_threads(threads)
    print(
        f"{description}; {args.compression}x; us per call of the hashed GEMV, median of {args.rounds} rounds"
    )
    result = {}
    for kind, group in groups.items():
        one, two = (statistics.median(times[(kind, t)][2:] or times[(kind, t)]) for t in (1, 2))
        layer = group[0][0]
        print(
            f"{kind:<10} {layer.out_features}x{layer.in_features:<6} 1 thread {one:7.1f}   2 threads {two:7.1f}"
        )
        result[kind] = (one, two)
    return result


if __name__ == "__main__":
    main()
