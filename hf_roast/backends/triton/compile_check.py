"""Compile every kernel launch that dispatch can make, ahead of time, for real GPU targets, on any machine.

The Triton interpreter checks the kernels' arithmetic, not the hardware's limits: a launch whose shared
memory exceeds the GPU's per-block limit raises ``OutOfResources`` only at its first real launch, and a
kernel that spills registers to local memory runs, slowly. Triton compiles for a named target without a
GPU or a driver (``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``, with the ptxas that
ships in the wheel), so this module does it for every case of the matrix below and reads the result:

* registers and spill bytes from ptxas' ``-v`` log (``TRITON_DUMP_PTXAS_LOG``, on a fresh cache);
* shared memory from the compiled metadata, against the target's per-block limit;
* how ``tl.dot`` lowered, from the PTX: ``wgmma`` (sm_90), ``mma`` (tensor cores, sm_80+), ``tcgen05``
  (sm_100) or ``fma`` (CUDA cores).

Each case is built by the launchers' own ``*_launch`` functions (``roast_matmul.py``) from abstract
tensors, and bound by Triton's own launch binder, so its specialisation (integer types, ``M == 1`` as a
constexpr, divisibility by 16), blocks, warps and stages are those of a real launch.

A case fails on a compile error, on shared memory over the limit, or on any spill of the stable and roast
mappers; hashednet (the papers' baseline) must compile and fit, and its spills are reported only.

The compiles run in worker subprocesses without ``TRITON_INTERPRET`` (the interpreter replaces
``triton.jit`` at import time) and never touch a CUDA driver: each worker asserts so before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from .launch import EXTRA_TARGETS, TARGETS, TIER_ROWS, TIERS, Target

KERNELS = ("fwd", "grad_input", "grad_z", "emb_fwd", "emb_grad_z")
DTYPES = ("fp32", "tf32", "bf16", "fp16")
"""Activation dtypes: ``fp32`` with torch's TF32 switch off (its default), ``tf32`` with it on."""
ZSTORES = ("act", "fp32", "int8", "int4")
"""z storage: the activation dtype, fp32, or packed integer codes with fp32 group scales."""
MAPPER_SIGNS = (
    ("stable", "tile"),
    ("stable", "element"),
    ("roast", "tile"),
    ("roast", "element"),
    ("hashednet", "tile"),
    ("hashednet", "element"),
)
"""Sign ``none`` compiles to the same code as ``tile`` (the sign is folded into the per-tile scale)."""
TIER_M = {"decode": 1, "mid": 48, "prefill": 4096}
"""The row count each tier is compiled with (decode: ``M == 1``, the generation case, a constexpr)."""
SHAPE = (4096, 4096)
"""(out, in) features of the linear layer compiled; divisible by 16, as model dims are."""
EMBEDDING = (32000, 4096)
WIDE_SHAPES = {"linear": (65536, 32768), "embedding": (524288, 4096)}
"""2**31 weights at compression 1: z and the virtual index reach 2**31, so the int64 kernels launch."""
TILE = (32, 32)
GROUP = 128
"""The default mapping tile and z quantisation group (RoastConfig)."""
HALF = {"bf16", "fp16"}
WORKER_MODULE = "hf_roast.backends.triton.compile_check"


@dataclass(frozen=True)
class Case:
    kernel: str
    target: str
    tier: str  # "-" for the embeddings: their blocks do not depend on the row count
    dtype: str
    zstore: str  # "-" where z is not read (the gradients of z)
    mapper: str = "stable"
    sign: str = "tile"
    wide: bool = False  # a layer of 2**31 weights: the kernels' int64 index arithmetic

    @property
    def label(self) -> str:
        return (
            f"{self.target:<6} {self.kernel:<10} {self.tier:<7} {self.dtype:<4} z={self.zstore:<4} "
            f"{self.mapper:<9} {self.sign:<7}{' wide' if self.wide else ''}"
        )


@dataclass
class Result:
    case: Case
    error: str | None = None
    registers: int | None = None
    spill: int | None = None  # spill store + load bytes per thread
    shared: int | None = None
    shared_limit: int = 0
    dot: str = "-"
    num_warps: int = 0
    num_stages: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def judge(self) -> None:
        """Fill ``problems``: what makes this case fail (a hashednet spill is reported, not failed)."""
        if self.error:
            self.problems.append("compile error")
            return
        if self.shared > self.shared_limit:
            self.problems.append(f"shared {self.shared} > {self.shared_limit}")
        if self.spill and self.case.mapper != "hashednet":
            self.problems.append(f"spills {self.spill} B")

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        head = self.case.label
        if self.error:
            return f"{head} FAIL compile error: {self.error.splitlines()[0][:160]}"
        status = "ok  " if self.ok else "FAIL"
        note = "; ".join(self.problems)
        if self.ok and self.spill:
            note = f"spills {self.spill} B (reported: hashednet is a baseline)"
        return (
            f"{head} {status} regs={self.registers:<3} spill={self.spill:<6} shared={self.shared:<6} "
            f"dot={self.dot:<7} warps={self.num_warps} stages={self.num_stages} {self.seconds:4.1f}s"
            + (f"  {note}" if note else "")
        )


# --------------------------------------------------------------------------------------------------
# The matrix.
# --------------------------------------------------------------------------------------------------
def zstores_for(dtype: str) -> tuple[str, ...]:
    """z storages distinct for this activation dtype (fp32 activations: 'act' is fp32)."""
    return ZSTORES if dtype in HALF else ("fp32", "int8", "int4")


def core_cases(target: str, mapper: str = "stable", sign: str = "tile") -> list[Case]:
    """Every kernel, activation dtype, z storage and tier, for one mapper and sign."""
    cases = []
    for tier in TIERS:
        for dtype in DTYPES:
            for zstore in zstores_for(dtype):
                for kernel in ("fwd", "grad_input"):
                    cases.append(Case(kernel, target, tier, dtype, zstore, mapper, sign))
            cases.append(Case("grad_z", target, tier, dtype, "-", mapper, sign))
    for dtype in DTYPES:
        if dtype == "tf32":
            continue  # no tl.dot in the embeddings: tf32 is fp32
        for zstore in zstores_for(dtype):
            cases.append(Case("emb_fwd", target, "-", dtype, zstore, mapper, sign))
        cases.append(Case("emb_grad_z", target, "-", dtype, "-", mapper, sign))
    return cases


def variant_cases(target: str, mapper: str, sign: str) -> list[Case]:
    """A mapper or sign other than the default: every kernel and tier, in the dtypes and z storages where
    the mapping code differs (fp32 and bf16 activations, float and packed z)."""
    cases = []
    for tier in TIERS:
        for dtype, zstore in (("bf16", "act"), ("fp32", "fp32"), ("bf16", "int4"), ("fp32", "int8")):
            for kernel in ("fwd", "grad_input"):
                cases.append(Case(kernel, target, tier, dtype, zstore, mapper, sign))
        for dtype in ("bf16", "fp32"):
            cases.append(Case("grad_z", target, tier, dtype, "-", mapper, sign))
    for dtype, zstore in (("bf16", "act"), ("fp32", "fp32"), ("bf16", "int4")):
        cases.append(Case("emb_fwd", target, "-", dtype, zstore, mapper, sign))
    for dtype in ("bf16", "fp32"):
        cases.append(Case("emb_grad_z", target, "-", dtype, "-", mapper, sign))
    return cases


def wide_cases(target: str) -> list[Case]:
    """The int64 index arithmetic (z or a module of 2**31 values and more), for the default mapping."""
    cases = []
    for tier in TIERS:
        for dtype, zstore in (("bf16", "act"), ("fp32", "fp32"), ("bf16", "int4")):
            for kernel in ("fwd", "grad_input"):
                cases.append(Case(kernel, target, tier, dtype, zstore, wide=True))
        cases.append(Case("grad_z", target, tier, "bf16", "-", wide=True))
    cases.append(Case("emb_fwd", target, "-", "bf16", "act", wide=True))
    cases.append(Case("emb_grad_z", target, "-", "bf16", "-", wide=True))
    return cases


SUBSETS = ("full", "ci")


def matrix(subset: str = "full", targets: list[str] | None = None) -> list[Case]:
    """``full``: every target, the core matrix for the stable mapper plus every other mapper and sign.
    ``ci``: sm_80 and sm_90, the core matrix of the default mapping (stable, tile signs)."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    if targets is None:
        targets = ["sm_80", "sm_90"] if subset == "ci" else list(TARGETS) + available_extra_targets()
    cases = []
    for target in targets:
        cases += core_cases(target)
        if subset == "full":
            for mapper, sign in MAPPER_SIGNS[1:]:
                cases += variant_cases(target, mapper, sign)
            cases += wide_cases(target)
    return cases


def unsupported_reason() -> str | None:
    """None when this triton can compile for NVIDIA targets ahead of time; otherwise why not."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as exc:
        return f"triton or its NVIDIA backend is missing ({exc})"
    if not hasattr(JITFunction, "_pack_args"):
        return f"triton {triton.__version__} lacks the launch binder this check uses (Triton 3.9 has it)"
    return None


def all_targets() -> dict[str, Target]:
    return {**TARGETS, **{name: target for name, (target, _) in EXTRA_TARGETS.items()}}


def table_name(target: str) -> str:
    """The launch table entry a target launches with (an extra target borrows its class's)."""
    return EXTRA_TARGETS[target][1] if target in EXTRA_TARGETS else target


def available_extra_targets() -> list[str]:
    """The extra targets (sm_100, sm_120) that the bundled ptxas can compile for."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return []
    names = []
    for name, (target, _) in EXTRA_TARGETS.items():
        try:
            help_text = subprocess.run(
                [get_ptxas(target.capability).path, "--help"], capture_output=True, text=True, timeout=60
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if f"sm_{target.capability}" in help_text:
            names.append(name)
    return names


# --------------------------------------------------------------------------------------------------
# One case: abstract tensors -> the launchers' Launch -> Triton's binder -> triton.compile.
# --------------------------------------------------------------------------------------------------
class AbstractTensor:
    """What Triton's launch binder reads from a tensor: dtype, shape, strides and a 16-byte-aligned address."""

    def __init__(self, dtype, *shape: int):
        self.dtype, self.shape = dtype, tuple(shape)

    def stride(self, dim: int) -> int:
        out = 1
        for size in self.shape[dim + 1 :]:
            out *= size
        return out

    def numel(self) -> int:
        out = 1
        for size in self.shape:
            out *= size
        return out

    @staticmethod
    def data_ptr() -> int:
        return 0  # the caching allocator's blocks are 512-byte aligned


def _plan(mapper: str, sign: str, kind: str, wide: bool):
    from hf_roast.mapping import MappingPlan, ModuleSpec

    if wide:
        rows, cols = WIDE_SHAPES[kind]
    else:
        rows, cols = EMBEDDING if kind == "embedding" else SHAPE
    spec = ModuleSpec("m", kind, rows, cols, 0.5)
    compression = 1.0 if wide else 8.0
    return MappingPlan.build([spec], mapper=mapper, sign=sign, seed=0, tile=TILE, compression=compression)


def build_launch(case: Case):
    """The launchers' Launch for this case, built from abstract tensors."""
    import torch

    from . import roast_matmul as rm

    act = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        case.dtype
    ]
    kind = "embedding" if case.kernel.startswith("emb") else "linear"
    plan = _plan(case.mapper, case.sign, kind, case.wide)
    spec = plan.modules[0]
    geo = rm.Geometry.of(plan, spec)
    m = plan.num_slots
    A = AbstractTensor
    tile_slot = A(torch.int64, spec.n_tiles(plan.tile)) if plan.is_tiled else None
    tile_scale = A(torch.float32, spec.n_tiles(plan.tile))
    scaler_inv = A(torch.float32, m // plan.scaler_unit())
    packed = None
    if case.zstore in ("int8", "int4"):
        bits = int(case.zstore[3:])
        z = A(torch.int8 if bits == 8 else torch.uint8, m if bits == 8 else m // 2)
        packed = (A(torch.float32, m // GROUP), bits, GROUP)
    else:
        z = A(act if case.zstore == "act" else torch.float32, m)
    target = table_name(case.target)
    rows = TIER_M.get(case.tier, 4096)
    with _tf32(case.dtype == "tf32"):
        if case.kernel == "fwd":
            x, y = A(act, rows, geo.cols), A(act, rows, geo.rows)
            return rm.linear_forward_launch(
                x, z, A(act, geo.rows), tile_slot, tile_scale, geo, packed, y, target
            )
        if case.kernel == "grad_input":
            dy, dx = A(act, rows, geo.rows), A(act, rows, geo.cols)
            return rm.linear_grad_input_launch(dy, z, tile_slot, tile_scale, geo, packed, dx, target)
        if case.kernel == "grad_z":
            dy, x = A(act, rows, geo.rows), A(act, rows, geo.cols)
            return rm.linear_grad_z_launch(
                dy, x, tile_slot, tile_scale, scaler_inv, geo, A(torch.float32, m), target
            )
        ids = A(torch.int64, rows)
        if case.kernel == "emb_fwd":
            out = A(act, rows, geo.cols)
            return rm.embedding_forward_launch(ids, z, tile_slot, tile_scale, geo, packed, out)
        grad = A(act, rows, geo.cols)
        return rm.embedding_grad_z_launch(
            ids, grad, tile_slot, tile_scale, scaler_inv, geo, A(torch.float32, m)
        )


@contextlib.contextmanager
def _tf32(on: bool):
    import torch

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def dot_lowering(ptx: str) -> str:
    """How tl.dot lowered, read from the PTX."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "tcgen05.mma" in ptx:
        return "tcgen05"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma"
    return "fma"


def compile_case(case: Case) -> Result:
    """Compile one case for its target (in a worker: no interpreter, fresh cache, ptxas log on)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = all_targets()[case.target]
    result = Result(case, shared_limit=target.shared_limit)
    start = time.perf_counter()
    try:
        launch = build_launch(case)
        kernel = launch.kernel
        gpu = GPUTarget("cuda", target.capability, 32)
        backend = make_backend(gpu)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(**launch.args, debug=kernel.debug)
        options, signature, constexprs, attrs = kernel._pack_args(
            backend, options, bound, specialization, options
        )
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs), target=gpu, options=options.__dict__
            )
        text = log.getvalue()
        registers = _REGISTERS.findall(text)
        spills = _SPILLS.findall(text)
        if not registers or not spills:
            raise RuntimeError(f"no ptxas -v report in the compile log: {text[-300:]!r}")
        result.registers = int(registers[-1])
        result.spill = int(spills[-1][0]) + int(spills[-1][1])
        result.shared = int(compiled.metadata.shared)
        result.num_warps = int(compiled.metadata.num_warps)
        result.num_stages = int(compiled.metadata.num_stages)
        result.dot = (
            dot_lowering(compiled.asm["ptx"]) if case.kernel in ("fwd", "grad_input", "grad_z") else "-"
        )
    except Exception as exc:  # a compile failure is a result, not a crash of the check
        root = exc
        while root.__cause__ is not None:  # Triton wraps the cause in a CompilationError per call level
            root = root.__cause__
        result.error = f"{type(root).__name__}: {root}".strip().replace("\n", " | ")
    result.seconds = time.perf_counter() - start
    result.judge()
    return result


# --------------------------------------------------------------------------------------------------
# Workers: subprocesses with a clean environment.
# --------------------------------------------------------------------------------------------------
def worker_env(cache_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(
        TRITON_CACHE_DIR=cache_dir,  # fresh: ptxas runs, and prints its report, for every case
        TRITON_ALWAYS_COMPILE="1",
        TRITON_DUMP_PTXAS_LOG="1",
        TRITON_DEFAULT_FP_FUSION=env.get("TRITON_DEFAULT_FP_FUSION", "1"),  # a launch's default, silenced
        CUDA_VISIBLE_DEVICES="",  # belt and braces: nothing here may reach a GPU
    )
    return env


def _worker_main(todo: str) -> int:
    """Compile the cases of file ``todo`` (JSON lines); write the results (JSON lines) on stdout."""
    out = sys.stdout
    with open(todo) as f:
        lines = f.readlines()
    for line in lines:
        result = compile_case(Case(**json.loads(line)))
        out.write(json.dumps(asdict(result)) + "\n")
        out.flush()
    _assert_no_driver()
    return 0


def _assert_no_driver() -> None:
    from triton.runtime import driver

    if driver._active is not None or driver._default is not None:
        raise SystemExit("compile check: a Triton driver was initialised; the check must never touch one")
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        raise SystemExit("compile check: CUDA was initialised; the check must never touch a driver")


def run_cases(cases: list[Case], jobs: int = 0, on_result=None) -> list[Result]:
    """Compile the cases in ``jobs`` worker subprocesses (0: one per CPU core); results in case order."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(cases)))
    results: dict[int, Result] = {}
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="hf-roast-check-") as cache:
        workers = []
        for j in range(jobs):
            mine = list(range(j, len(cases), jobs))
            todo = os.path.join(cache, f"cases-{j}.jsonl")  # a file, not stdin: no pipe can fill up
            with open(todo, "w") as f:
                f.write("".join(json.dumps(asdict(cases[i])) + "\n" for i in mine))
            proc = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, "--worker", todo],
                stdout=subprocess.PIPE,
                text=True,
                env=worker_env(os.path.join(cache, str(j))),
            )
            workers.append((proc, mine))

        def read(proc, mine):
            for i, line in zip(mine, proc.stdout):
                data = json.loads(line)
                result = Result(**{**data, "case": Case(**data["case"])})
                with lock:
                    results[i] = result
                    if on_result is not None:
                        on_result(result)

        threads = [threading.Thread(target=read, args=w) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for proc, _ in workers:
            if proc.wait() != 0:
                raise RuntimeError(f"compile check worker exited with {proc.returncode}")
    missing = [cases[i].label for i in range(len(cases)) if i not in results]
    if missing:
        raise RuntimeError(f"compile check: no result for {len(missing)} cases, e.g. {missing[0]}")
    return [results[i] for i in range(len(cases))]


# --------------------------------------------------------------------------------------------------
# Summary and the command line.
# --------------------------------------------------------------------------------------------------
def summary(results: list[Result]) -> str:
    """Per target: cases, failures by kind, and reported (hashednet) spills."""
    lines = []
    for target in dict.fromkeys(r.case.target for r in results):
        mine = [r for r in results if r.case.target == target]
        counts = Counter()
        for r in mine:
            counts["compile error"] += bool(r.error)
            counts["over shared"] += any(p.startswith("shared") for p in r.problems)
            counts["spills (stable/roast)"] += any(p.startswith("spills") for p in r.problems)
            counts["spills (hashednet, reported)"] += bool(r.ok and r.spill)
        lines.append(
            f"{target}: {len(mine)} cases, {sum(not r.ok for r in mine)} failing ("
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + ")"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="hf-roast check-gpu",
        description="Compile every fused kernel launch for real GPU targets ahead of time (no GPU needed) and "
        "fail on compile errors, shared memory over the target's limit, or register spills of the stable "
        "and roast mappers.",
    )
    p.add_argument(
        "--subset", choices=SUBSETS, default="full", help="ci: sm_80 and sm_90, the default mapping"
    )
    p.add_argument("--targets", default=None, help=f"comma-separated, from {', '.join(all_targets())}")
    p.add_argument("--kernels", default=None, help=f"comma-separated, from {', '.join(KERNELS)}")
    p.add_argument("--mappers", default=None, help="comma-separated mappers to keep")
    p.add_argument("--jobs", type=int, default=0, help="worker processes (default: one per CPU core)")
    p.add_argument("--json", default=None, help="also write every result to this JSON file")
    p.add_argument("--failures-only", action="store_true", help="print only failing and spilling cases")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _split(text: str | None, allowed) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"unknown {bad}: choose from {', '.join(allowed)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return _worker_main(args.worker)
    reason = unsupported_reason()
    if reason is not None:
        print(f"hf-roast check-gpu cannot run: {reason}", file=sys.stderr)
        return 2
    cases = matrix(args.subset, _split(args.targets, all_targets()))
    kernels = _split(args.kernels, KERNELS)
    mappers = _split(args.mappers, [m for m, _ in MAPPER_SIGNS])
    cases = [
        c
        for c in cases
        if (kernels is None or c.kernel in kernels) and (mappers is None or c.mapper in mappers)
    ]
    print(
        f"hf-roast check-gpu: {len(cases)} cases ({args.subset}), tile {TILE}, layer {SHAPE}, rows {TIER_M}"
    )
    start = time.perf_counter()

    def show(result: Result) -> None:
        if not args.failures_only or not result.ok or result.spill:
            print(result.line(), flush=True)

    results = run_cases(cases, args.jobs, show)
    print(f"\n{summary(results)}\n{time.perf_counter() - start:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 1 if any(not r.ok for r in results) else 0


assert set(TIER_M) == set(TIERS) and all(TIER_M[t] <= n for t, n in TIER_ROWS.items())

if __name__ == "__main__":
    sys.exit(main())
