"""Launch configurations of the fused kernels: one table per GPU target and row tier, read by the launchers
and covered, case by case, by the ahead-of-time compile check (:mod:`.compile_check`).

Why a table, not ``triton.autotune``: autotuning benchmarks every candidate on first use (slow under the
interpreter, noisy on a shared GPU) and may pick a configuration that nobody compiled ahead of time. The
table is deterministic, and ``hf-roast check-gpu`` proves that every entry compiles, fits the target's
shared memory and does not spill.

Targets are classes of GPUs with the same per-block shared-memory limit (what decides which pipelines fit):

* ``sm_80``: A100, A30 (and sm_87, Jetson Orin): 163 KiB;
* ``sm_89``: consumer and inference parts, sm_86 / sm_89 / sm_120 (RTX 30xx / 40xx / 50xx, A10, L4, L40): 99 KiB;
* ``sm_90``: H100 / H200 (and the datacenter Blackwell parts, sm_100): 227 KiB.

This module imports neither torch's CUDA runtime nor triton: the table is plain data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

TIERS = ("decode", "mid", "prefill")
"""Row tiers: decoding (at most 16 rows), short prompts (at most 64), prefill and training."""
TIER_ROWS = {"decode": 16, "mid": 64}
"""The largest row count of each tier but the last."""


def tier_of(rows: int) -> str:
    for tier, limit in TIER_ROWS.items():
        if rows <= limit:
            return tier
    return TIERS[-1]


@dataclass(frozen=True)
class Target:
    """A GPU class: the capability the check compiles for and its per-block shared-memory limit (bytes)."""

    name: str
    capability: int
    shared_limit: int


TARGETS = {
    "sm_80": Target("sm_80", 80, 166_912),
    "sm_89": Target("sm_89", 89, 101_376),
    "sm_90": Target("sm_90", 90, 232_448),
}
"""The launch table's targets. Extra targets the compile check may add when the bundled ptxas has them."""
EXTRA_TARGETS = {
    "sm_100": (Target("sm_100", 100, 232_448), "sm_90"),
    "sm_120": (Target("sm_120", 120, 101_376), "sm_89"),
}
"""Checked when the bundled ptxas supports them: (target, the table entry they launch with)."""


def table_target(capability: tuple[int, int]) -> str:
    """The launch table's target for a device of this compute capability (major, minor)."""
    major, minor = capability
    if major in (8, 7) and minor in (0, 7):
        return "sm_80"
    if major in (9, 10):
        return "sm_90"
    return "sm_89"  # sm_86, sm_89, sm_12x and anything unknown: the smallest shared memory


@dataclass(frozen=True)
class Blocks:
    """Kernel block sizes (tl.dot needs each >= 16), warps and software-pipeline stages.

    Independent of the mapping tile. ``m`` is the row block (grad_z: its reduction step), ``n`` the output
    features, ``k`` the input features.
    """

    m: int
    n: int
    k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for v in (self.m, self.n, self.k):
            if v < 16 or v & (v - 1):
                raise ValueError(f"Kernel block sizes must be powers of two >= 16, got {self}.")
        if self.num_stages < 1 or self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"Bad warps or stages: {self}.")


# --------------------------------------------------------------------------------------------------
# The table. Keys: (target, kernel family, tier, operand class).
#   family: "mm" (forward and dX: read W from z) or "grad_z" (dY^T X, reduced over rows);
#   operand class: "half" (bf16 / fp16 activations) or "fp32" (fp32 activations on tensor cores: tf32 or
#   tf32x3), then "-hashed" (a hash per weight: element signs or the hashednet mapper, whose registers need
#   shorter K steps). Packed z (int8 / int4, dequantised in registers) fits the same blocks: the check
#   covers it in every entry.
# --------------------------------------------------------------------------------------------------
_B = Blocks
_MM_DATACENTER = {
    ("decode", "half"): _B(16, 64, 128, 4, 3),
    ("decode", "fp32"): _B(16, 64, 64, 4, 2),
    ("mid", "half"): _B(64, 64, 64, 4, 3),
    ("mid", "fp32"): _B(64, 64, 32, 4, 2),
    ("prefill", "half"): _B(128, 128, 64, 8, 3),
    ("prefill", "fp32"): _B(128, 128, 16, 8, 3),
}
_MM_HOPPER = {
    **_MM_DATACENTER,
    ("prefill", "fp32"): _B(128, 128, 32, 8, 3),  # wgmma: the accumulator lives apart from the operands
}
_MM_CONSUMER = {  # 99 KiB of shared memory per block
    **_MM_DATACENTER,
    ("prefill", "half"): _B(128, 128, 64, 8, 2),
}
_MM_HASHED = {  # a hash per weight (element signs, hashednet) in the K loop: smaller blocks
    ("decode", "half"): _B(16, 32, 32, 8, 2),
    ("decode", "fp32"): _B(16, 32, 16, 4, 2),
    ("mid", "half"): _B(64, 64, 32, 4, 3),
    ("mid", "fp32"): _B(64, 64, 16, 4, 2),
    ("prefill", "half"): _B(128, 128, 32, 8, 3),
    ("prefill", "fp32"): _B(128, 128, 16, 8, 3),
}
_GRAD_Z = {  # m is the reduction step over rows: short, so the dY and X tiles stay small
    ("decode", "half"): _B(16, 64, 64, 4, 3),
    ("decode", "fp32"): _B(16, 64, 64, 4, 2),
    ("mid", "half"): _B(32, 64, 64, 4, 3),
    ("mid", "fp32"): _B(32, 64, 64, 4, 2),
    ("prefill", "half"): _B(64, 128, 32, 8, 3),
    ("prefill", "fp32"): _B(32, 128, 32, 8, 3),
}
LAUNCH_TABLE: dict[tuple[str, str, str, str], Blocks] = {}
for _target, _mm in (("sm_80", _MM_DATACENTER), ("sm_89", _MM_CONSUMER), ("sm_90", _MM_HOPPER)):
    for (_tier, _cls), _blocks in _mm.items():
        LAUNCH_TABLE[(_target, "mm", _tier, _cls)] = _blocks
    for (_tier, _cls), _blocks in _MM_HASHED.items():
        LAUNCH_TABLE[(_target, "mm", _tier, _cls + "-hashed")] = _blocks
    for (_tier, _cls), _blocks in _GRAD_Z.items():
        LAUNCH_TABLE[(_target, "grad_z", _tier, _cls)] = _blocks

EMBEDDING_ROWS = 16
"""Looked-up rows per embedding block; the column block covers up to 256 features."""


def operand_class(half: bool, hashed: bool = False) -> str:
    return ("half" if half else "fp32") + ("-hashed" if hashed else "")


def table_blocks(target: str, family: str, rows: int, half: bool, hashed: bool = False) -> Blocks:
    """The table's blocks for one launch. ``hashed`` (a hash per weight in the K loop) only matters to the
    "mm" family: grad_z hashes once per block, after its loop."""
    return LAUNCH_TABLE[(target, family, tier_of(rows), operand_class(half, hashed and family == "mm"))]


def embedding_blocks(n_cols: int) -> tuple[int, int]:
    """(rows, cols) of an embedding block: a gather has no reduction, so one table serves every target."""
    cols = 16
    while cols < min(256, n_cols):
        cols *= 2
    return EMBEDDING_ROWS, cols


def with_stages(blocks: Blocks, num_stages: int) -> Blocks:
    return replace(blocks, num_stages=num_stages)


@functools.lru_cache(maxsize=16)
def device_target(index: int) -> str:
    """The table target of CUDA device ``index`` (asks torch once per device)."""
    import torch

    return table_target(torch.cuda.get_device_capability(index))
