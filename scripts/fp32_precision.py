"""How accurate each fp32 ``tl.dot`` precision is, measured against the PyTorch path under the interpreter.

    TRITON_INTERPRET=1 python scripts/fp32_precision.py [--rows 64 --in 1024 --out 256]
    TRITON_INTERPRET=1 python -m hf_roast.scripts.fp32_precision     # installed

fp32 activations leave the kernels a choice (``roast_matmul._dot_precision``): "ieee" (CUDA-core FMA, fp32
exactly), "tf32x3" (three TF32 tensor-core products: the operands split into a TF32 high part and a TF32
remainder) or "tf32" (one TF32 product, 10-bit mantissas). The interpreter emulates each one's operand
rounding (``_dot`` with ``EMULATE``), so the figures are the GPU's rounding with the interpreter's summation
order. Every figure is a max-norm relative error, ``max |a - b| / max |b|``, of the forward (y), dX and dz:

* against the PyTorch path in fp32 (what the kernels are tested against);
* against the PyTorch path in fp64 (the exact product of the same fp32 inputs): the PyTorch path's own fp32
  error is printed beside it, as the yardstick.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

CANDIDATES = ("ieee", "tf32x3", "tf32")


def _linear(fn, x, z, lm, grad_y):
    x = x.detach().requires_grad_()
    z = z.detach().requires_grad_()
    y = fn(x, z, None, lm)
    dx, dz = torch.autograd.grad(y, (x, z), grad_y)
    return {"y": y.detach(), "dx": dx, "dz": dz}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def measure(rows: int = 64, in_features: int = 1024, out_features: int = 256, seed: int = 0) -> dict:
    """Errors of every candidate (and of the PyTorch path's fp32) for one fp32 layer; needs the interpreter."""
    from hf_roast.backends.pytorch import RoastLinearFunction
    from hf_roast.backends.triton import ops
    from hf_roast.backends.triton.roast_matmul import INTERPRETED, forced_fp32_precision
    from hf_roast.mapping import LayerMapping, MappingPlan, ModuleSpec, gradient_scaler

    if not INTERPRETED:
        raise RuntimeError("run under the Triton interpreter: TRITON_INTERPRET=1 before triton is imported")
    spec = ModuleSpec("q", "linear", out_features, in_features, 0.5)
    plan = MappingPlan.build([spec], mapper="stable", sign="tile", seed=seed, tile=(32, 32), compression=4.0)
    lm = LayerMapping(plan, spec, plan.tile_slots(spec), plan.tile_scales(spec), gradient_scaler(plan, "v5"))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g)
    z = torch.randn(plan.num_slots, generator=g)
    grad_y = torch.randn(rows, out_features, generator=g)
    torch32 = _linear(RoastLinearFunction.apply, x, z, lm, grad_y)
    lm64 = LayerMapping(plan, spec, lm.tile_slot, lm.tile_scale, lm.scaler_inv.double())
    exact = _linear(RoastLinearFunction.apply, x.double(), z.double(), lm64, grad_y.double())
    report = {"shape": [rows, in_features, out_features], "torch_fp32_vs_fp64": {}, "candidates": {}}
    for name in exact:
        report["torch_fp32_vs_fp64"][name] = _rel(torch32[name], exact[name])
    for precision in CANDIDATES:
        with forced_fp32_precision(precision):
            got = _linear(ops.triton_roast_linear, x, z, lm, grad_y)
        report["candidates"][precision] = {
            name: {"vs_torch_fp32": _rel(got[name], torch32[name]), "vs_fp64": _rel(got[name], exact[name])}
            for name in exact
        }
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--in", dest="in_features", type=int, default=1024)
    p.add_argument("--out", dest="out_features", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = p.parse_args(argv)
    report = measure(args.rows, args.in_features, args.out_features)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"rows x in x out = {report['shape']}; max-norm relative errors")
    print(f"{'':<22}" + "".join(f"{n:>12}" for n in ("y", "dx", "dz")))
    print(
        f"{'torch fp32 vs fp64':<22}" + "".join(f"{v:12.2e}" for v in report["torch_fp32_vs_fp64"].values())
    )
    for precision, errors in report["candidates"].items():
        for against in ("vs_torch_fp32", "vs_fp64"):
            label = f"{precision} {against.replace('_', ' ')}"
            print(f"{label:<22}" + "".join(f"{e[against]:12.2e}" for e in errors.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
