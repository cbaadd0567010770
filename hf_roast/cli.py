"""The ``hf-roast`` console command: ``hf-roast {demo,compress,recover,bench,check-gpu,memory} ...``.

Each subcommand lives in ``scripts/`` (installed as ``hf_roast.scripts``) and is imported lazily. The research
harness is not a subcommand: it lives in ``benchmarks/`` of a clone (``python -m benchmarks.evaluate``).
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "demo": ("hf_roast.scripts.demo", "Compress a small model, train a few steps, save, reload, report."),
    "compress": (
        "hf_roast.scripts.compress_folder",
        "Compress a local HF model folder into a ROAST checkpoint.",
    ),
    "recover": (
        "hf_roast.scripts.recover",
        "Compress a dense model and distil it back on unlabelled text (task-agnostic recovery).",
    ),
    "bench": ("hf_roast.scripts.bench_kernels", "Benchmark ROAST matmuls against dense and HashedNet."),
    "check-gpu": (
        "hf_roast.scripts.check_gpu",
        "Compile every fused kernel for real GPUs ahead of time (no GPU needed): limits, spills, tl.dot lowering.",
    ),
    "memory": (
        "hf_roast.scripts.memory",
        "Train a 134M-parameter Llama dense and compressed; print memory and step time side by side.",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        width = max(map(len, SUBCOMMANDS)) + 1
        lines = [f"  {name:<{width}} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
        print("usage: hf-roast {" + ",".join(SUBCOMMANDS) + "} [args]\n\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
