"""The from-scratch experiment at 64x-1024x, summarised: a table, a verdict per compression, the plots.

The question (docs/results.md, "From scratch at 64x-1024x"): at the compressions where the STABLE-RPS paper
says sharing pulls ahead, does hf-roast beat pruning at init (magnitude and random) and a narrower model that
stores as many projection values, once dense has levelled off? Each arm's JSON comes from
``python -m benchmarks.evaluate --experiments scratch-high``; this module only reads them.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

FOLDER = "scratch_high"
METHODS = {
    "roast": "hf-roast (stable, module_balance)",
    "prune-magnitude": "pruning at init, magnitude",
    "prune-random": "pruning at init, random",
    "narrower": "narrower model",
}
"""The compared methods, in table order; dense and the floor are references."""
STYLE = {
    "roast": ("tab:red", "o"),
    "prune-magnitude": ("tab:blue", "s"),
    "prune-random": ("tab:cyan", "v"),
    "narrower": ("tab:green", "^"),
}
DECIDING = (256.0, 1024.0)


def method_of(arm: dict) -> str:
    if arm["method"] == "prune":
        return f"prune-{arm.get('prune_by', 'magnitude')}"
    return arm["method"]


def load(results_dir: Path) -> list[dict]:
    """Every arm with a trained rate. One saved between two learning rates (a breadth-first sweep stopped
    before its grid ended) counts with the rates it has and is flagged: ``rates_trained`` of ``rates_planned``."""
    folder = Path(results_dir) / FOLDER
    rows = []
    for path in sorted(folder.glob("*.json")):
        result = json.loads(path.read_text())
        if not result.get("lr_search"):
            continue
        arm = result["arm"]
        trained = len(result["lr_search"])
        rows.append(
            {
                "name": arm["name"],
                "method": method_of(arm),
                "compression": arm["compression"],
                "steps": result["setup"]["steps"],
                "seed": arm["seed"],
                "tile": tuple(arm["tile"]),
                "bits_per_byte": result["bits_per_byte"],
                "val_bits_per_byte": result["val_bits_per_byte"],
                "lr": result["selected_lr"],
                "lrs": [r["lr"] for r in result["lr_search"]],
                "rates_trained": trained,
                "rates_planned": trained if result.get("complete") is not False else len(arm["lrs"] or ()),
                # another seed's rate, chosen before that seed's long arm had trained all its rates
                "rate_from_partial": arm.get("rate_from_partial"),
                "projection_bytes": result["storage"]["target_bytes"],
                "model_bytes": result["storage"]["model_bytes"],
                "training_memory": result["storage"].get("training_memory", {}),
                "val_curves": {r["lr"]: r.get("val_curve", []) for r in result["lr_search"]},
            }
        )
    return rows


def _mean(rows: list[dict]) -> float:
    return statistics.fmean(r["bits_per_byte"] for r in rows)


def _complete(row: dict) -> bool:
    return row["rates_trained"] >= row["rates_planned"]


def grouped(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(method, compression, steps) -> its seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["method"], r["compression"], r["steps"]].append(r)
    return groups


def verdicts(rows: list[dict]) -> list[dict]:
    """Per budget and compression: hf-roast's margin to each baseline (mean over seeds; positive = ahead)."""
    groups = grouped(rows)
    out = []
    for steps in sorted({r["steps"] for r in rows}):
        for c in sorted({r["compression"] for r in rows if r["method"] == "roast" and r["steps"] == steps}):
            roast = groups.get(("roast", c, steps))
            if not roast:
                continue
            margins = {}
            for method in METHODS:
                if method != "roast" and groups.get((method, c, steps)):
                    margins[method] = round(_mean(groups[method, c, steps]) - _mean(roast), 4)
            involved = roast + [r for m in margins for r in groups[m, c, steps]]
            out.append(
                {
                    "steps": steps,
                    "compression": c,
                    "roast_bits_per_byte": round(_mean(roast), 4),
                    "seeds": len(roast),
                    "margins": margins,
                    "ahead_of_all": bool(margins) and all(m > 0 for m in margins.values()),
                    "complete": len(margins) == len(METHODS) - 1,
                    "every_rate_trained": all(_complete(r) for r in involved),
                }
            )
    return out


def table(rows: list[dict]) -> str:
    """Markdown: one row per arm group, held-out bits/byte (seed mean), bytes and training memory."""
    groups = grouped(rows)
    lines = [
        "| budget | compression | method | held-out bits/byte | seeds | rate | projection bytes | model bytes "
        "| training memory (params + grads + AdamW + masks) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {m: i for i, m in enumerate(["dense", *METHODS, "floor"])}
    for (method, c, steps), seeds in sorted(
        groups.items(), key=lambda kv: (kv[0][2], -kv[0][1], order[kv[0][0]])
    ):
        first = seeds[0]
        memory = first["training_memory"]
        sparse = memory.get("with_sparse_kernels_bytes")
        memory_text = f"{memory.get('total_bytes', 0) / 1e6:.2f} MB" + (
            f" ({sparse / 1e6:.2f} MB with sparse kernels)" if sparse else ""
        )
        label = {"dense": "dense", "floor": "floor (no projections)"}.get(method, METHODS.get(method, method))
        tile = f", tile {first['tile'][0]}x{first['tile'][1]}" if method == "roast" else ""
        rate = f"{first['lr']:g}" + (
            "" if _complete(first) else f" ({first['rates_trained']} of {first['rates_planned']} rates)"
        )
        each = ", ".join(f"{s['bits_per_byte']:.3f}" for s in seeds)
        spread = f" ({each})" if len(seeds) > 1 else ""
        lines.append(
            f"| {steps} | {'-' if method in ('dense', 'floor') else f'{c:g}x'} | {label}{tile} | "
            f"{_mean(seeds):.3f}{spread} | {len(seeds)} | {rate} | {first['projection_bytes']:,} | "
            f"{first['model_bytes']:,} | {memory_text} |"
        )
    return "\n".join(lines)


def plot_frontier(rows: list[dict], steps: int, path: Path) -> bool:
    """Held-out bits/byte against the projections' stored bytes at one budget: one line per method, dense
    and the floor as references. Returns False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = grouped([r for r in rows if r["steps"] == steps])
    if not any(m == "roast" for m, _, _ in groups):
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, label in METHODS.items():
        points = sorted(
            (seeds[0]["projection_bytes"], _mean(seeds), c)
            for (m, c, _), seeds in groups.items()
            if m == method
        )
        if points:
            colour, marker = STYLE[method]
            ax.plot([p[0] for p in points], [p[1] for p in points], color=colour, marker=marker, label=label)
            for x, y, c in points:
                ax.annotate(f"{c:g}x", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for method, style, label in (("dense", "--", "dense (all projections)"), ("floor", ":", "floor (none)")):
        seeds = next((s for (m, _, _), s in groups.items() if m == method), None)
        if seeds:
            ax.axhline(_mean(seeds), color="black", linestyle=style, linewidth=1, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes of the projection weights (values + mask or indices; log scale)")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title(f"From scratch, {steps} steps: byte-level Llama, 4 layers, width 256")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_dense_curve(rows: list[dict], path: Path) -> bool:
    """Validation bits/byte of dense over training at every learning rate of its longest run: has it levelled
    off? Returns False when no curve exists yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = [r for r in rows if r["method"] == "dense" and any(r["val_curves"].values())]
    if not dense:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in sorted(dense, key=lambda r: (r["steps"], r["seed"])):
        for lr, curve in sorted(r["val_curves"].items()):
            if curve:
                ax.plot(*zip(*curve), marker=".", label=f"dense, lr {lr:g}, seed {r['seed']}")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Has dense levelled off? (validation, every 400 steps)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results_dir: Path) -> dict | None:
    """``scratch_high.md``, ``scratch_high.json`` and the plots in ``results_dir``; None without results."""
    results_dir = Path(results_dir)
    if not (results_dir / FOLDER).is_dir():
        return None
    rows = load(results_dir)
    if not rows:
        return None
    found = verdicts(rows)
    md = ["# From scratch at 64x-1024x\n", table(rows), "\n## hf-roast's margin (positive: hf-roast ahead)\n"]
    for v in found:
        margins = ", ".join(f"{METHODS[m]} {d:+.3f}" for m, d in v["margins"].items())
        word = "ahead of every baseline" if v["ahead_of_all"] else "behind at least one baseline"
        md.append(
            f"- {v['steps']} steps, {v['compression']:g}x ({v['seeds']} seed(s)): {word}"
            f"{'' if v['complete'] else ' (not every baseline finished)'}"
            f"{'' if v['every_rate_trained'] else ' (not every rate of the grid trained yet)'}: {margins}"
        )
    plots = []
    for steps in sorted({r["steps"] for r in rows}):
        name = f"scratch_high_{steps}steps.png"
        if plot_frontier(rows, steps, results_dir / name):
            plots.append(name)
    if plot_dense_curve(rows, results_dir / "scratch_high_dense_curve.png"):
        plots.append("scratch_high_dense_curve.png")
    (results_dir / "scratch_high.md").write_text("\n".join(md) + "\n")
    summary = {"verdicts": found, "plots": plots, "arms": [r["name"] for r in rows]}
    (results_dir / "scratch_high.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
