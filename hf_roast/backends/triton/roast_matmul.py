"""Fused Triton kernels for ROAST linear layers and embeddings, and their launchers.

Every kernel reads weights straight from the shared array ``z``: the weight at (row ``r``, col ``c``)
of a module sits at ``z[slot(tile) * T + e]`` (tile mappers; ``slot`` comes from the layer's small
``tile_slot`` table) or at the jitted HashedNet hash (``hashednet``). Consecutive columns of one
mapping tile are consecutive in ``z``, so a block aligned with the mapping tile reads each row of
it with one coalesced load. Kernel blocks are free: a block may cover several mapping tiles or cut
through them, because the location is computed per element from ``(r, c)``, never from the block.

Accumulation is fp32 throughout. ``dz`` is accumulated with fp32 atomics, so several kernel blocks,
several tiles sharing a slot and several modules can all add into the same slot.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hf_roast.mapping import (
    MappingPlan,
    ModuleSpec,
    is_tiled_mapper,
    scaler_unit,
    seed_constants,
    tiles_along,
)
from hf_roast.vocab import MAPPER_IDS, MAPPERS, SIGN_IDS

from .mapping_jit import (
    code_of,
    dequantize_value,
    group_of,
    hash_sign,
    hashednet_slot,
    storage_index,
    tile_coordinates,
    virtual_index,
)

HASHEDNET = tl.constexpr(MAPPER_IDS["hashednet"])
ELEMENT_SIGN = tl.constexpr(SIGN_IDS["element"])

# Scalar int arguments that may equal 1 must not be specialised into constexprs (``.to`` needs a tensor).
_NO_SPECIALIZE = [
    "tile_offset",
    "seg_start",
    "seg_size",
    "slot_a",
    "slot_b",
    "sign_a",
    "sign_b",
    "n_tile_cols",
]


@torch.compiler.assume_constant_result
def _hash_constants(seed: int) -> tuple[int, int, int, int]:
    """Seeded slot and sign constants. SHA-256 is opaque to torch.compile: it folds the result instead."""
    return (*seed_constants(seed, "slot"), *seed_constants(seed, "sign"))


# --------------------------------------------------------------------------------------------------
# Geometry: the plain ints a kernel needs to locate a module's weights (custom ops take no objects).
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """One module's mapping as scalars: shape, tile, mapper, sign and the seeded hash constants."""

    rows: int
    cols: int
    tile_rows: int
    tile_cols: int
    mapper: int
    sign: int
    tile_offset: int
    seg_start: int
    seg_size: int
    slot_a: int
    slot_b: int
    sign_a: int
    sign_b: int

    @classmethod
    def of(cls, plan: MappingPlan, spec: ModuleSpec) -> Geometry:
        slot_a, slot_b, sign_a, sign_b = _hash_constants(plan.seed)
        return cls(
            spec.rows, spec.cols, plan.tile[0], plan.tile[1], MAPPER_IDS[plan.mapper], SIGN_IDS[plan.sign],
            spec.tile_offset, spec.segment_start, spec.segment_size, slot_a, slot_b, sign_a, sign_b,
        )  # fmt: skip

    def as_list(self) -> list[int]:
        return [getattr(self, f) for f in self.__dataclass_fields__]

    @classmethod
    def from_list(cls, values: list[int]) -> Geometry:
        return cls(*(int(v) for v in values))

    # the plan's own formulas, on this geometry's scalars (custom ops pass ints, not plans)
    @property
    def tiled(self) -> bool:
        return is_tiled_mapper(MAPPERS[self.mapper])

    @property
    def n_tile_cols(self) -> int:
        return tiles_along(self.cols, self.tile_cols)

    @property
    def scaler_unit(self) -> int:
        """z elements per entry of ``scaler_inv``: a slot tile for tile mappers, one element for hashednet."""
        return scaler_unit(MAPPERS[self.mapper], (self.tile_rows, self.tile_cols))

    def kernel_args(self) -> dict[str, int]:
        return dict(
            n_rows=self.rows, n_cols=self.cols, n_tile_cols=self.n_tile_cols, tile_offset=self.tile_offset,
            seg_start=self.seg_start, seg_size=self.seg_size, slot_a=self.slot_a, slot_b=self.slot_b,
            sign_a=self.sign_a, sign_b=self.sign_b, TR=self.tile_rows, TC=self.tile_cols,
            MAPPER=self.mapper, SIGN=self.sign,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Block sizes: a small table, overridable (tests prove the result does not depend on it).
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Blocks:
    """Kernel block sizes (tl.dot needs each >= 16) and warps. Independent of the mapping tile."""

    m: int
    n: int
    k: int
    num_warps: int = 4

    def __post_init__(self) -> None:
        for v in (self.m, self.n, self.k):
            if v < 16 or v & (v - 1):
                raise ValueError(f"Kernel block sizes must be powers of two >= 16, got {self}.")


_forced_blocks: Blocks | None = None


@contextmanager
def forced_blocks(blocks: Blocks | None) -> Iterator[None]:
    """Run every launch inside the context with these block sizes (tests, tuning experiments)."""
    global _forced_blocks
    previous, _forced_blocks = _forced_blocks, blocks
    try:
        yield
    finally:
        _forced_blocks = previous


def pick_blocks(rows: int, dtype: torch.dtype) -> Blocks:
    """Block sizes by the number of activation rows: thin blocks for decoding, big ones for prefill.

    A table rather than ``triton.autotune``: autotuning benchmarks every config on first use (slow
    under the interpreter, noisy on a shared GPU), and the table is deterministic.
    """
    if _forced_blocks is not None:
        return _forced_blocks
    wide = dtype != torch.float32  # half-precision tiles are half the bytes: afford a longer K step
    if rows <= 16:
        return Blocks(16, 64, 128 if wide else 64, 4)
    if rows <= 64:
        return Blocks(64, 64, 64 if wide else 32, 4)
    return Blocks(128, 128, 64 if wide else 32, 8)


# --------------------------------------------------------------------------------------------------
# Device functions.
# --------------------------------------------------------------------------------------------------
@triton.jit
def _locate(
    r, c, n_rows, n_cols, slot_ptr, scale_ptr, n_tile_cols, tile_offset, seg_start, seg_size,
    slot_a, slot_b, sign_a, sign_b,
    TR: tl.constexpr, TC: tl.constexpr, MAPPER: tl.constexpr, SIGN: tl.constexpr,
):  # fmt: skip
    """z index, lambda * sign, and validity of weight (r, c); r and c broadcast against each other."""
    r = r.to(tl.int64)
    c = c.to(tl.int64)
    mask = (r < n_rows) & (c < n_cols)
    local_tile, element = tile_coordinates(r, c, n_tile_cols.to(tl.int64), TR, TC)
    scale = tl.load(scale_ptr + local_tile, mask=mask, other=0.0)
    virtual = virtual_index(local_tile, element, tile_offset.to(tl.int64), TR * TC)  # dead unless hashed
    if MAPPER == HASHEDNET:
        index = hashednet_slot(
            virtual, seg_start.to(tl.int64), seg_size.to(tl.int64), slot_a.to(tl.int64), slot_b.to(tl.int64)
        )
    else:
        index = tl.load(slot_ptr + local_tile, mask=mask, other=0) * (TR * TC) + element
    if SIGN == ELEMENT_SIGN:
        scale = scale * hash_sign(virtual, sign_a.to(tl.int64), sign_b.to(tl.int64)).to(tl.float32)
    index = tl.where(mask, index, 0)
    return index, scale, mask


@triton.jit
def _round_to(x, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in ``DTYPE``.

    Under the interpreter (``EMULATE``) the bf16 cast truncates, so the rounding is done on the bits
    first; the final cast is then exact. On a GPU the native cast already rounds to nearest-even.
    """
    if EMULATE and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """acc + a @ b in fp32. The interpreter multiplies bf16 as raw integers, so it gets fp32 operands
    (products of half-precision values are exact in fp32: the result is the same)."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _load_packed(z_ptr, zs_ptr, index, mask, ZBITS: tl.constexpr, ZGROUP: tl.constexpr):
    """z[index] of a packed z, dequantised in registers (fp32): its code times its group's scale."""
    raw = tl.load(z_ptr + storage_index(index, ZBITS), mask=mask, other=0).to(tl.int64)
    code = code_of(raw, index, ZBITS).to(tl.float32)
    return dequantize_value(code, tl.load(zs_ptr + group_of(index, ZGROUP), mask=mask, other=0.0))


@triton.jit
def _load_weight(
    z_ptr, zs_ptr, index, scale, mask, OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
    ZBITS: tl.constexpr, ZGROUP: tl.constexpr,
):  # fmt: skip
    """lambda * sign * z[index] rounded like the PyTorch path: the product in z's dtype, then a cast.
    ``ZBITS`` 8 or 4: z is packed codes (``zs_ptr`` its group scales), read as fp32; 0: z is floats."""
    if ZBITS != 0:
        zval = _load_packed(z_ptr, zs_ptr, index, mask, ZBITS, ZGROUP)
    else:
        zval = tl.load(z_ptr + index, mask=mask, other=0.0)
    if zval.dtype == tl.float32:
        w = zval * scale
    else:  # torch multiplies two half tensors in fp32 and rounds the product to the half dtype
        w = zval.to(tl.float32) * _round_to(scale, zval.dtype, EMULATE).to(tl.float32)
        w = _round_to(w, zval.dtype, EMULATE).to(tl.float32)
    return _round_to(w, OUT_DTYPE, EMULATE)


# --------------------------------------------------------------------------------------------------
# Linear: forward, dX, dz.
# --------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _linear_fwd_kernel(
    x_ptr, z_ptr, zs_ptr, slot_ptr, scale_ptr, bias_ptr, y_ptr, M, stride_xm, stride_ym,
    n_rows, n_cols, n_tile_cols, tile_offset, seg_start, seg_size, slot_a, slot_b, sign_a, sign_b,
    TR: tl.constexpr, TC: tl.constexpr, MAPPER: tl.constexpr, SIGN: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    ZBITS: tl.constexpr, ZGROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[M, N] = x[M, K] @ W^T (+ b); W is ``n_rows (=N) x n_cols (=K)``, read from z block by block."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < n_cols),
            other=0.0,
        )
        # W^T block [BLOCK_K, BLOCK_N]: row r = output feature n, column c = input feature k.
        index, scale, mask = _locate(
            offs_n[None, :], offs_k[:, None], n_rows, n_cols, slot_ptr, scale_ptr, n_tile_cols, tile_offset,
            seg_start, seg_size, slot_a, slot_b, sign_a, sign_b, TR, TC, MAPPER, SIGN,
        )  # fmt: skip
        w_t = _load_weight(z_ptr, zs_ptr, index, scale, mask, x.dtype, EMULATE, ZBITS, ZGROUP)
        acc = _dot(x, w_t, acc, DOT_PRECISION, EMULATE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < n_rows, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
        _round_to(acc, y_ptr.dtype.element_ty, EMULATE),
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < n_rows),
    )


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _linear_grad_input_kernel(
    dy_ptr, z_ptr, zs_ptr, slot_ptr, scale_ptr, dx_ptr, M, stride_dym, stride_dxm,
    n_rows, n_cols, n_tile_cols, tile_offset, seg_start, seg_size, slot_a, slot_b, sign_a, sign_b,
    TR: tl.constexpr, TC: tl.constexpr, MAPPER: tl.constexpr, SIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE: tl.constexpr, ZBITS: tl.constexpr, ZGROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dX[M, K] = dY[M, N] @ W[N, K], with the same tile reads as the forward."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, n_rows, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
            mask=(offs_m[:, None] < M) & (offs_n[None, :] < n_rows),
            other=0.0,
        )
        index, scale, mask = _locate(
            offs_n[:, None], offs_k[None, :], n_rows, n_cols, slot_ptr, scale_ptr, n_tile_cols, tile_offset,
            seg_start, seg_size, slot_a, slot_b, sign_a, sign_b, TR, TC, MAPPER, SIGN,
        )  # fmt: skip
        w = _load_weight(z_ptr, zs_ptr, index, scale, mask, dy.dtype, EMULATE, ZBITS, ZGROUP)
        acc = _dot(dy, w, acc, DOT_PRECISION, EMULATE)
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :],
        _round_to(acc, dx_ptr.dtype.element_ty, EMULATE),
        mask=(offs_m[:, None] < M) & (offs_k[None, :] < n_cols),
    )


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _linear_grad_z_kernel(
    dy_ptr, x_ptr, slot_ptr, scale_ptr, inv_ptr, dz_ptr, M, stride_dym, stride_xm,
    n_rows, n_cols, n_tile_cols, tile_offset, seg_start, seg_size, slot_a, slot_b, sign_a, sign_b,
    TR: tl.constexpr, TC: tl.constexpr, MAPPER: tl.constexpr, SIGN: tl.constexpr,
    HAS_SCALER: tl.constexpr, SCALER_UNIT: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dz[h(n, k)] += lambda * g * (dY^T X)[n, k] / s: one [BLOCK_N, BLOCK_K] block of dW, reduced over M."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        dy_t = tl.load(
            dy_ptr + offs_m[None, :] * stride_dym + offs_n[:, None],
            mask=(offs_m[None, :] < M) & (offs_n[:, None] < n_rows),
            other=0.0,
        )
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < n_cols),
            other=0.0,
        )
        if dy_t.dtype != x.dtype:  # mixed dtypes: the PyTorch path computes dW in fp32
            dy_t = dy_t.to(tl.float32)
            x = x.to(tl.float32)
        acc = _dot(dy_t, x, acc, DOT_PRECISION, EMULATE)
    index, scale, mask = _locate(
        offs_n[:, None], offs_k[None, :], n_rows, n_cols, slot_ptr, scale_ptr, n_tile_cols, tile_offset,
        seg_start, seg_size, slot_a, slot_b, sign_a, sign_b, TR, TC, MAPPER, SIGN,
    )  # fmt: skip
    if HAS_SCALER:
        scale = scale * tl.load(inv_ptr + index // SCALER_UNIT, mask=mask, other=0.0)
    tl.atomic_add(dz_ptr + index, acc * scale, mask=mask)


# --------------------------------------------------------------------------------------------------
# Embedding: gather and scatter of the looked-up rows only.
# --------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _embedding_fwd_kernel(
    ids_ptr, z_ptr, zs_ptr, slot_ptr, scale_ptr, out_ptr, n_ids,
    n_rows, n_cols, n_tile_cols, tile_offset, seg_start, seg_size, slot_a, slot_b, sign_a, sign_b,
    TR: tl.constexpr, TC: tl.constexpr, MAPPER: tl.constexpr, SIGN: tl.constexpr, EMULATE: tl.constexpr,
    ZBITS: tl.constexpr, ZGROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_i = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    ids = tl.load(ids_ptr + offs_i, mask=offs_i < n_ids, other=n_rows).to(tl.int64)  # n_rows: masked out
    index, scale, mask = _locate(
        ids[:, None], offs_c[None, :], n_rows, n_cols, slot_ptr, scale_ptr, n_tile_cols, tile_offset,
        seg_start, seg_size, slot_a, slot_b, sign_a, sign_b, TR, TC, MAPPER, SIGN,
    )  # fmt: skip
    if ZBITS != 0:
        zval = _load_packed(z_ptr, zs_ptr, index, mask, ZBITS, ZGROUP)
    else:
        zval = tl.load(z_ptr + index, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + offs_i[:, None] * n_cols + offs_c[None, :],
        _round_to(zval * scale, out_ptr.dtype.element_ty, EMULATE),
        mask=(offs_i[:, None] < n_ids) & (offs_c[None, :] < n_cols),
    )


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _embedding_grad_z_kernel(
    ids_ptr, grad_ptr, slot_ptr, scale_ptr, inv_ptr, dz_ptr, n_ids,
    n_rows, n_cols, n_tile_cols, tile_offset, seg_start, seg_size, slot_a, slot_b, sign_a, sign_b,
    TR: tl.constexpr, TC: tl.constexpr, MAPPER: tl.constexpr, SIGN: tl.constexpr,
    HAS_SCALER: tl.constexpr, SCALER_UNIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_i = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    ids = tl.load(ids_ptr + offs_i, mask=offs_i < n_ids, other=n_rows).to(tl.int64)
    index, scale, mask = _locate(
        ids[:, None], offs_c[None, :], n_rows, n_cols, slot_ptr, scale_ptr, n_tile_cols, tile_offset,
        seg_start, seg_size, slot_a, slot_b, sign_a, sign_b, TR, TC, MAPPER, SIGN,
    )  # fmt: skip
    grad = tl.load(grad_ptr + offs_i[:, None] * n_cols + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALER:
        scale = scale * tl.load(inv_ptr + index // SCALER_UNIT, mask=mask, other=0.0)
    tl.atomic_add(dz_ptr + index, grad * scale, mask=mask)


INTERPRETED = type(_linear_fwd_kernel).__name__ == "InterpretedFunction"
"""True when TRITON_INTERPRET=1 was set before this module was imported: the kernels then run on CPU."""


# --------------------------------------------------------------------------------------------------
# Launchers (plain tensors in, tensors out; the custom ops in ``ops.py`` wrap these).
# --------------------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 switch, so the kernel agrees with ``nn.Linear`` on the same GPU."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _table(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A placeholder pointer for an absent table (the kernel never reads it when its flag is off)."""
    return t if t is not None else like


def _z_args(z: torch.Tensor, packed: tuple[torch.Tensor, int, int] | None) -> dict:
    """z's pointers and format: ``packed`` is (group scales, bits, group size) when z holds packed codes."""
    if packed is None:
        return dict(z_ptr=z, zs_ptr=z, ZBITS=0, ZGROUP=1)
    scales, bits, group = packed
    return dict(z_ptr=z, zs_ptr=scales, ZBITS=bits, ZGROUP=group)


def linear_forward(
    x2: torch.Tensor, z: torch.Tensor, bias: torch.Tensor | None, tile_slot: torch.Tensor | None,
    tile_scale: torch.Tensor, geo: Geometry, packed: tuple[torch.Tensor, int, int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """y = x2 @ W^T (+ b) for a 2-D, row-contiguous x2 (``packed``: z is codes, see :func:`_z_args`)."""
    m = x2.shape[0]
    y = torch.empty((m, geo.rows), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y
    b = pick_blocks(m, x2.dtype)
    grid = (triton.cdiv(m, b.m), triton.cdiv(geo.rows, b.n))
    _linear_fwd_kernel[grid](
        x_ptr=x2, slot_ptr=_table(tile_slot, tile_scale), scale_ptr=tile_scale, bias_ptr=_table(bias, tile_scale),
        y_ptr=y, M=m, stride_xm=x2.stride(0), stride_ym=y.stride(0), **_z_args(z, packed),
        **geo.kernel_args(), HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x2.dtype), EMULATE=INTERPRETED,
        BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_K=b.k, num_warps=b.num_warps,
    )  # fmt: skip
    return y


def linear_grad_input(
    dy2: torch.Tensor, z: torch.Tensor, tile_slot: torch.Tensor | None, tile_scale: torch.Tensor,
    geo: Geometry, out_dtype: torch.dtype, packed: tuple[torch.Tensor, int, int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """dX = dY @ W for a 2-D, row-contiguous dY."""
    m = dy2.shape[0]
    dx = torch.empty((m, geo.cols), dtype=out_dtype, device=dy2.device)
    if m == 0:
        return dx
    b = pick_blocks(m, dy2.dtype)
    grid = (triton.cdiv(m, b.m), triton.cdiv(geo.cols, b.k))
    _linear_grad_input_kernel[grid](
        dy_ptr=dy2, slot_ptr=_table(tile_slot, tile_scale), scale_ptr=tile_scale, dx_ptr=dx, M=m,
        stride_dym=dy2.stride(0), stride_dxm=dx.stride(0), **_z_args(z, packed), **geo.kernel_args(), DOT_PRECISION=_dot_precision(dy2.dtype), EMULATE=INTERPRETED,
        BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_K=b.k, num_warps=b.num_warps,
    )  # fmt: skip
    return dx


def linear_grad_z(
    dy2: torch.Tensor, x2: torch.Tensor, tile_slot: torch.Tensor | None, tile_scale: torch.Tensor,
    scaler_inv: torch.Tensor | None, geo: Geometry, num_slots: int,
) -> torch.Tensor:  # fmt: skip
    """This module's fp32 dz (length ``num_slots``), reduced over the rows of dY and X."""
    dz = torch.zeros(num_slots, dtype=torch.float32, device=dy2.device)
    m = dy2.shape[0]
    if m == 0:
        return dz
    b = pick_blocks(m, dy2.dtype)
    # The grid runs over W's blocks; each reduces over all rows, so M blocks stay moderate.
    grid = (triton.cdiv(geo.rows, b.n), triton.cdiv(geo.cols, b.k))
    _linear_grad_z_kernel[grid](
        dy2, x2, _table(tile_slot, tile_scale), tile_scale, _table(scaler_inv, tile_scale), dz, m,
        dy2.stride(0), x2.stride(0), **geo.kernel_args(), HAS_SCALER=scaler_inv is not None,
        SCALER_UNIT=geo.scaler_unit, DOT_PRECISION=_dot_precision(dy2.dtype), EMULATE=INTERPRETED,
        BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_K=b.k, num_warps=b.num_warps,
    )  # fmt: skip
    return dz


def _embedding_blocks(n_cols: int) -> tuple[int, int]:
    forced = _forced_blocks
    if forced is not None:
        return forced.m, forced.k
    return 16, min(256, triton.next_power_of_2(max(16, n_cols)))


def embedding_forward(
    ids: torch.Tensor, z: torch.Tensor, tile_slot: torch.Tensor | None, tile_scale: torch.Tensor,
    geo: Geometry, dtype: torch.dtype, packed: tuple[torch.Tensor, int, int] | None = None,
) -> torch.Tensor:  # fmt: skip
    flat = ids.reshape(-1).contiguous()
    out = torch.empty((flat.numel(), geo.cols), dtype=dtype, device=z.device)
    if flat.numel() == 0:
        return out.view(*ids.shape, geo.cols)
    block_r, block_c = _embedding_blocks(geo.cols)
    grid = (triton.cdiv(flat.numel(), block_r), triton.cdiv(geo.cols, block_c))
    _embedding_fwd_kernel[grid](
        ids_ptr=flat, slot_ptr=_table(tile_slot, tile_scale), scale_ptr=tile_scale, out_ptr=out, n_ids=flat.numel(),
        **_z_args(z, packed), **geo.kernel_args(), EMULATE=INTERPRETED, BLOCK_R=block_r, BLOCK_C=block_c,
    )  # fmt: skip
    return out.view(*ids.shape, geo.cols)


def embedding_grad_z(
    ids: torch.Tensor, grad: torch.Tensor, tile_slot: torch.Tensor | None, tile_scale: torch.Tensor,
    scaler_inv: torch.Tensor | None, geo: Geometry, num_slots: int,
) -> torch.Tensor:  # fmt: skip
    flat = ids.reshape(-1).contiguous()
    dz = torch.zeros(num_slots, dtype=torch.float32, device=grad.device)
    if flat.numel() == 0:
        return dz
    grad2 = grad.reshape(flat.numel(), geo.cols).contiguous()
    block_r, block_c = _embedding_blocks(geo.cols)
    grid = (triton.cdiv(flat.numel(), block_r), triton.cdiv(geo.cols, block_c))
    _embedding_grad_z_kernel[grid](
        flat, grad2, _table(tile_slot, tile_scale), tile_scale, _table(scaler_inv, tile_scale), dz, flat.numel(),
        **geo.kernel_args(), HAS_SCALER=scaler_inv is not None, SCALER_UNIT=geo.scaler_unit,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )  # fmt: skip
    return dz
