"""SmartDeal's weight error against round-to-nearest at equal bytes, per projection type of the pinned MiniLM.

``python -m benchmarks.smartdeal_error [--layout 4,4,8] [--iterations 10]`` decomposes every encoder linear of
all-MiniLM-L6-v2 (and its pooler) at 8x and 16x fewer bytes than fp32, and at exactly the bytes of per-group
round-to-nearest int4, int3 and int2 (groups of 128, one fp32 scale each: about 7.5x, 9.8x and 14.2x), and prints the relative
weight error ``||W' - W||_F / ||W||_F`` of each, per projection type. It is the cheap half of the SmartDeal
baseline (seconds per budget, no training): if SmartDeal loses to RTN here, the fine-tuning arm starts behind.
"""

from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict

import torch

from benchmarks.harness.smartdeal import DEFAULT_LAYOUT, Layout, decompose, nonzeros_for_bytes, packed_nbytes

RTN_GROUP = 128


def rtn_nbytes(numel: int, bits: int, group_size: int = RTN_GROUP) -> int:
    """Bytes of ``numel`` values as packed ``bits``-bit codes plus one fp32 scale per group."""
    return math.ceil(numel * bits / 8) + 4 * math.ceil(numel / group_size)


@torch.no_grad()
def rtn_weight(w: torch.Tensor, bits: int, group_size: int = RTN_GROUP) -> torch.Tensor:
    """Symmetric per-group round-to-nearest (codes in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``, absmax scale), the
    grid of the harness's ``rtn`` arms (:func:`hf_roast.quant.fake_quantize_groups` at 4 bits) at any width."""
    qmax = 2 ** (bits - 1) - 1
    flat = w.detach().double().reshape(-1)
    pad = -flat.numel() % group_size
    groups = torch.cat([flat, flat.new_zeros(pad)]).view(-1, group_size)
    scale = groups.abs().amax(1, keepdim=True) / qmax
    q = torch.round(groups / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(-qmax, qmax) * scale
    return q.reshape(-1)[: flat.numel()].view_as(w)


def projection_type(name: str) -> str:
    """``encoder.layer.3.attention.self.query.weight`` -> ``attention.self.query``."""
    return re.sub(r"^(?:.*\.)?layer\.\d+\.", "", name).removesuffix(".weight")


def _rtn(w: torch.Tensor, bits: int) -> tuple[float, int]:
    """(squared weight error, stored bytes) of one matrix under round-to-nearest."""
    return float((rtn_weight(w, bits) - w.double()).pow(2).sum()), rtn_nbytes(w.numel(), bits)


def _smartdeal(w: torch.Tensor, budget: int, layout: Layout, iterations: int) -> tuple[float, int]:
    """(squared weight error, stored bytes) of one matrix decomposed into at most ``budget`` bytes."""
    d = decompose(w, layout, nonzeros_for_bytes(*w.shape, layout, budget), iterations)
    nonzeros = int((d.cq != 0).sum())
    return d.relative_error**2 * float(w.double().pow(2).sum()), packed_nbytes(*w.shape, layout, nonzeros)


def compare(
    weights: dict[str, torch.Tensor],
    layout: Layout = DEFAULT_LAYOUT,
    ratios: tuple[float, ...] = (8.0, 16.0),
    rtn_bits: tuple[int, ...] = (4, 3, 2),
    iterations: int = 10,
) -> list[dict]:
    """Relative weight error per (projection type, method), plus an ``all`` row per method.

    Methods: ``smartdeal {r}x`` (each matrix in ``4 * numel / r`` bytes), ``rtn int{b}`` and ``smartdeal @ rtn
    int{b}`` (SmartDeal in exactly RTN's bytes of that matrix). Each row has the method's bytes ratio against fp32.
    """
    methods = {
        f"smartdeal {r:g}x": lambda w, r=r: _smartdeal(w, math.floor(4 * w.numel() / r), layout, iterations)
        for r in ratios
    }
    for b in rtn_bits:
        methods[f"rtn int{b}"] = lambda w, b=b: _rtn(w, b)
        methods[f"smartdeal @ rtn int{b}"] = lambda w, b=b: _smartdeal(
            w, rtn_nbytes(w.numel(), b), layout, iterations
        )
    err: dict[tuple[str, str], float] = defaultdict(float)
    ref: dict[str, float] = defaultdict(float)
    stored: dict[tuple[str, str], int] = defaultdict(int)
    dense: dict[str, int] = defaultdict(int)
    for name, w in weights.items():
        kind = projection_type(name)
        sq = float(w.double().pow(2).sum())
        for key in (kind, "all"):
            ref[key] += sq
            dense[key] += 4 * w.numel()
        for method, measure in methods.items():
            e, nbytes = measure(w)
            for key in (kind, "all"):
                err[key, method] += e
                stored[key, method] += nbytes
    return [
        {
            "projection": kind,
            "method": method,
            "relative_error": (err[kind, method] / ref[kind]) ** 0.5,
            "bytes_ratio": dense[kind] / stored[kind, method],
        }
        for kind in sorted(ref, key=lambda k: k == "all")  # the total last
        for method in methods
    ]


def markdown(rows: list[dict]) -> str:
    """One line per projection type, one column per method: relative error (bytes ratio)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["projection"], r["method"]): r for r in rows}
    lines = ["| projection | " + " | ".join(methods) + " |", "|" + " --- |" * (len(methods) + 1)]
    for kind in dict.fromkeys(r["projection"] for r in rows):
        cells = [f"{by[kind, m]['relative_error']:.4f} ({by[kind, m]['bytes_ratio']:.2f}x)" for m in methods]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def minilm_weights() -> dict[str, torch.Tensor]:
    """The pinned MiniLM's encoder and pooler linear weights (sha256-checked), as classification.py loads them."""
    from hf_roast.scripts.pinned_models import pinned_file
    from safetensors.torch import load_file

    state = load_file(str(pinned_file("minilm")))
    return {
        k: v.float()
        for k, v in state.items()
        if k.endswith(".weight") and v.dim() == 2 and not k.startswith("embeddings")
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.smartdeal_error", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--layout", default=None, help="chunk,rank,rows_per_basis (default: the arm's layout)")
    p.add_argument("--iterations", type=int, default=10, help="alternating least-squares iterations")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layout = Layout(*map(int, args.layout.split(","))) if args.layout else DEFAULT_LAYOUT
    print(f"all-MiniLM-L6-v2 encoder + pooler linears, {layout}, {args.iterations} ALS iterations")
    print("relative weight error ||W' - W|| / ||W|| (bytes ratio vs fp32)\n")
    print(markdown(compare(minilm_weights(), layout, iterations=args.iterations)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
