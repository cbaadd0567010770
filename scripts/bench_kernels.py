"""Benchmark a ROAST linear layer against a dense ``nn.Linear`` and against the HashedNet mapper.

All figures of one table come from one run, on one device, so the ratios are comparable. On a GPU with
Triton the ROAST and HashedNet layers run the fused kernels; elsewhere the PyTorch path (materialise
one weight at a time). The header says which.

    hf-roast bench                       # --quick: 4096x4096 at 1, 16, 512 rows (about 2 min on 2 CPU cores)
    hf-roast bench --full                # 4096x4096 and 4096x11008 at 1, 16, 512, 4096 rows (slow on a CPU)
    hf-roast bench --shapes 4096x4096 --rows 512,4096 --repeats 5
    hf-roast bench --generate            # generate() speed of SmolLM2-135M, dense vs 4x vs 16x (bench_generate.py)

Shapes are ``in x out`` features (``4096x11008``: a Llama-7B up projection). Times are medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from hf_roast.backends.cpu.ops import MAX_ROWS
from hf_roast.backends.dispatch import materialize_weight, resolve_backend, roast_linear
from hf_roast.backends.pytorch import clear_scratch
from hf_roast.mapping import LayerMapping, MappingPlan, ModuleSpec, gradient_scaler

QUICK_ROWS = (1, 16, 512)
QUICK_SHAPES = ((4096, 4096),)
FULL_ROWS = (1, 16, 512, 4096)
FULL_SHAPES = ((4096, 4096), (4096, 11008))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="hf-roast bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--shapes", default=None, help="comma-separated INxOUT (default: the --quick or --full set)"
    )
    p.add_argument("--rows", default=None, help="comma-separated batch*sequence rows (default: --quick set)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, rows {QUICK_ROWS} (the default)"
    )
    mode.add_argument("--full", action="store_true", help=f"shapes {FULL_SHAPES}, rows {FULL_ROWS}")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--dtype", default=None, choices=tuple(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU"
    )
    p.add_argument("--compression", type=float, default=16.0)
    p.add_argument("--tile", default="32x32", help="mapping tile ROWSxCOLS")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (fewer when one takes long)")
    p.add_argument(
        "--budget", type=float, default=2.0, help="stop repeating a figure after this many seconds"
    )
    p.add_argument("--no-hashednet", action="store_true", help="skip the (slow) HashedNet columns")
    return p.parse_args(argv)


def parse_pairs(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        a, _, b = item.lower().partition("x")
        if not (a.isdigit() and b.isdigit()):
            raise SystemExit(f"Bad shape {item!r}: write IN x OUT as e.g. 4096x11008.")
        pairs.append((int(a), int(b)))
    return pairs


class Timer:
    """Median wall time of a callable, synchronising the GPU so that queued kernels are counted."""

    def __init__(self, device: torch.device, repeats: int, budget: float):
        self.device, self.repeats, self.budget = device, repeats, budget

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()  # warm-up: kernel compilation, scratch buffers, allocator
        self.sync()
        first = time.perf_counter() - t0
        if first > self.budget:
            return first  # seconds-long runs (HashedNet on CPU): warm-up effects are noise, save the time
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < self.repeats and (len(times) < 2 or time.perf_counter() - start < self.budget):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def roast_layer(mapper: str, d_in: int, d_out: int, args, device, dtype) -> tuple[LayerMapping, torch.Tensor]:
    """One compressed module at ``args.compression`` with its own z (a model shares one z; same cost)."""
    spec = ModuleSpec("bench", "linear", d_out, d_in, 0.02)
    tile = tuple(int(v) for v in args.tile.lower().split("x"))
    plan = MappingPlan.build(
        [spec], mapper=mapper, sign="tile", seed=0, tile=tile, compression=args.compression
    )
    inv = gradient_scaler(plan, "v5", device)
    slots = plan.tile_slots(spec, device) if plan.is_tiled else None
    lm = LayerMapping(plan, spec, slots, plan.tile_scales(spec, device), inv)
    z = torch.randn(plan.num_slots, device=device).requires_grad_()
    return lm, z


def bench_shape(
    d_in: int, d_out: int, rows: int, args, timer: Timer, device, dtype, backend
) -> dict[str, float]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, d_in, generator=g).to(device, dtype).requires_grad_()
    grad_y = torch.randn(rows, d_out, generator=g).to(device, dtype)
    dense = nn.Linear(d_in, d_out, device=device, dtype=dtype)
    bias = torch.zeros(d_out, device=device, dtype=dtype, requires_grad=True)
    out: dict[str, float] = {}

    def fwd_bwd(forward: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            for p in params:
                p.grad = None
            forward().backward(grad_y)

        return step

    with torch.no_grad():
        out["dense_fwd"] = timer(lambda: dense(x))
    out["dense_fb"] = timer(fwd_bwd(lambda: dense(x), [x, dense.weight, dense.bias]))
    for mapper in ("stable",) if args.no_hashednet else ("stable", "hashednet"):
        lm, z = roast_layer(mapper, d_in, d_out, args, device, dtype)

        def forward(lm=lm, z=z) -> torch.Tensor:
            return roast_linear(x, z, bias, lm, "auto")  # `backend` is what auto resolves to

        with torch.no_grad():
            out[f"{mapper}_fwd"] = timer(forward)
            out[f"{mapper}_w"] = timer(lambda lm=lm, z=z: materialize_weight(z, lm, dtype, "auto"))
        out[f"{mapper}_fb"] = timer(fwd_bwd(forward, [x, z, bias]))
        del lm, z
        clear_scratch()
    return out


def describe(device: torch.device, backend: str, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    path = (
        "Triton kernels (hf_roast.backends.triton)"
        if backend == "triton"
        else "PyTorch path (hf_roast.backends.pytorch); no-grad forwards of at most "
        f"{MAX_ROWS} rows on the CPU path (hf_roast.backends.cpu)"
    )
    return (
        f"device: {name}; ROAST/HashedNet run on the {path}; activations {str(dtype).removeprefix('torch.')}"
    )


def main(argv: list[str] | None = None) -> int:
    if argv is not None and "--generate" in argv or argv is None and "--generate" in sys.argv[1:]:
        from hf_roast.scripts.bench_generate import main as generate_main

        return generate_main(argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch.")
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backend = resolve_backend("auto", device, (dtype,))
    shapes = parse_pairs(args.shapes) if args.shapes else list(FULL_SHAPES if args.full else QUICK_SHAPES)
    rows_list = (
        [int(r) for r in args.rows.split(",")] if args.rows else list(FULL_ROWS if args.full else QUICK_ROWS)
    )
    timer = Timer(device, args.repeats, args.budget)

    print(describe(device, backend, dtype))
    print(f"compression {args.compression:g}x, tile {args.tile}, sign=tile, scaler=v5; medians of up to "
          f"{args.repeats} runs; ms = milliseconds")  # fmt: skip
    print("ratio: ROAST time / dense nn.Linear time (lower is better); x: HashedNet time / ROAST time (ROAST's "
          "speed-up over the HashedNet mapper); f+b: forward + backward (dX, dz, db); W: materialising the dense "
          "weight from z with the PyTorch path\n")  # fmt: skip
    header = (
        f"{'in x out':>11} {'rows':>5} | {'dense fwd':>9} {'roast fwd':>9} {'ratio':>6} | {'dense f+b':>9} "
        f"{'roast f+b':>9} {'ratio':>6}"
    )
    if not args.no_hashednet:
        header += f" | {'W roast':>8} {'W hashed':>9} {'x':>6} | {'hashed fwd':>10} {'x':>6} | {'hashed f+b':>10} {'x':>6}"
    print(header)
    print("-" * len(header))
    for d_in, d_out in shapes:
        for rows in rows_list:
            r = bench_shape(d_in, d_out, rows, args, timer, device, dtype, "auto")  # per call, as a model
            line = (
                f"{d_in:>5}x{d_out:<5} {rows:>5} | {r['dense_fwd'] * 1e3:>9.2f} {r['stable_fwd'] * 1e3:>9.2f} "
                f"{r['stable_fwd'] / r['dense_fwd']:>6.2f} | {r['dense_fb'] * 1e3:>9.2f} {r['stable_fb'] * 1e3:>9.2f} "
                f"{r['stable_fb'] / r['dense_fb']:>6.2f}"
            )
            if not args.no_hashednet:
                line += (
                    f" | {r['stable_w'] * 1e3:>8.2f} {r['hashednet_w'] * 1e3:>9.2f} {r['hashednet_w'] / r['stable_w']:>6.1f}"
                    f" | {r['hashednet_fwd'] * 1e3:>10.2f} {r['hashednet_fwd'] / r['stable_fwd']:>6.1f}"
                    f" | {r['hashednet_fb'] * 1e3:>10.2f} {r['hashednet_fb'] / r['stable_fb']:>6.1f}"
                )
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
