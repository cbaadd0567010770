"""Benchmark a ROAST linear layer against a dense ``nn.Linear`` and against the HashedNet mapper.

All figures of one table come from one run, on one device, so the ratios are comparable. On a GPU with
Triton the ROAST and HashedNet layers run the fused kernels; elsewhere the PyTorch path (materialise
one weight at a time). The header says which.

    hf-roast bench                       # --quick: 4096x4096 at 1, 16, 512 rows (about 2 min on 2 CPU cores)
    hf-roast bench --full                # 4096x4096 and 4096x11008 at 1, 16, 512, 4096 rows (slow on a CPU)
    hf-roast bench --shapes 4096x4096 --rows 512,4096 --repeats 5
    hf-roast bench --generate            # generate() speed of SmolLM2-135M, dense vs 4x vs 16x (bench_generate.py)
    hf-roast bench --device cuda --full --json bench.json   # on a GPU: bf16 and fp32, numerics checked first

On CUDA the kernels' numerics are checked against the PyTorch path first (the run stops if they disagree),
then bf16 and fp32 are timed (``--dtype`` picks one). The kernels launch with the launch table that
``hf-roast check-gpu`` compiles ahead of time; nothing is autotuned. ``--json`` writes every figure with the
device, the versions and the launch-table target: send that file back (docs/kernels.md).

Shapes are ``in x out`` features (``4096x11008``: a Llama-7B up projection). Times are medians.
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--json", default=None, help="also write every figure, the device and the versions here")
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


NUMERICS_TOLERANCE = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}
"""Max-norm error / max |PyTorch path|; fp32 with torch's TF32 switch on is checked at TF32's 2e-3."""


NUMERICS_CASES = ((1, (520, 392)), (37, (520, 392)), (300, (1000, 776)))
"""(rows, (in, out)): decode, a short prompt, a prefill block; dims that are multiples of no block."""


def check_numerics(device: torch.device, dtype: torch.dtype, args, cases=NUMERICS_CASES) -> list[str]:
    """The kernels against the PyTorch path (forward, dX, dz) on odd shapes; a line per disagreement."""
    from hf_roast.backends.pytorch import RoastLinearFunction
    from hf_roast.backends.triton.ops import triton_roast_linear

    tol = NUMERICS_TOLERANCE[dtype]
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        tol = 2e-3
    problems = []
    for rows, (d_in, d_out) in cases:
        lm, z = roast_layer("stable", d_in, d_out, args, device, dtype)
        g = torch.Generator(device="cpu").manual_seed(rows)
        x = torch.randn(rows, d_in, generator=g).to(device, dtype)
        grad_y = torch.randn(rows, d_out, generator=g).to(device, dtype)
        results = []
        for fn in (triton_roast_linear, RoastLinearFunction.apply):
            xi, zi = x.clone().requires_grad_(), z.detach().clone().requires_grad_()
            y = fn(xi, zi, None, lm)
            results.append((y.detach(), *torch.autograd.grad(y, (xi, zi), grad_y)))
        for name, got, want in zip(("y", "dx", "dz"), *results):
            err = float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))
            if not err <= tol:
                problems.append(
                    f"{dtype} rows={rows} {d_in}x{d_out} {name}: relative error {err:.2e} > {tol:.0e}"
                )
    return problems


def environment(device: torch.device) -> dict:
    """What the JSON says about the machine: device, capability, launch-table target, versions."""
    info = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        from hf_roast.backends.triton.launch import table_target

        capability = torch.cuda.get_device_capability(device)
        info.update(name=torch.cuda.get_device_name(device), capability=list(capability),
                    launch_table=table_target(capability), cuda=torch.version.cuda)  # fmt: skip
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


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


def _write(path: str | None, report: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


def _table(device, backend, dtype, shapes, rows_list, args, timer):
    """Print one dtype's table; yield its figures (seconds) per shape and row count."""
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
            yield {"in": d_in, "out": d_out, "rows": rows, **r}
    print()


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
    if args.dtype:
        dtypes = [DTYPES[args.dtype]]
    else:
        dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    shapes = parse_pairs(args.shapes) if args.shapes else list(FULL_SHAPES if args.full else QUICK_SHAPES)
    rows_list = (
        [int(r) for r in args.rows.split(",")] if args.rows else list(FULL_ROWS if args.full else QUICK_ROWS)
    )
    timer = Timer(device, args.repeats, args.budget)
    report = {"environment": environment(device), "compression": args.compression, "tile": args.tile,
              "numerics": {}, "figures": []}  # fmt: skip
    for dtype in dtypes:
        backend = resolve_backend("auto", device, (dtype,))
        name = str(dtype).removeprefix("torch.")
        if backend == "triton":
            problems = check_numerics(device, dtype, args)
            report["numerics"][name] = problems or "ok"
            if problems:
                _write(args.json, report)
                raise SystemExit(
                    "the kernels disagree with the PyTorch path; not timing them:\n" + "\n".join(problems)
                )
            print(f"numerics: the kernels match the PyTorch path in {name} (forward, dX, dz)")
        for row in _table(device, backend, dtype, shapes, rows_list, args, timer):
            report["figures"].append({"dtype": name, "backend": backend, **row})
        _write(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
