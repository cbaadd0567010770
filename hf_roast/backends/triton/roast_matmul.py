"""Fused Triton kernels for ROAST linear layers and embeddings, and their launchers.

Every kernel reads weights straight from the shared array ``z``: the weight at (row ``r``, col ``c``)
of a module sits at ``z[slot(tile) * T + e]`` (tile mappers; ``slot`` comes from the layer's small
``tile_slot`` table) or at the jitted HashedNet hash (``hashednet``). Consecutive columns of one
mapping tile are consecutive in ``z``, so a block aligned with the mapping tile reads each row of
it with one coalesced load. Kernel blocks are free: a block may cover several mapping tiles or cut
through them. Per-tile values (slot, scale, scaler) and packed z's group scales are loaded once per cell
of the tile / group grid that the block covers and broadcast (:func:`_locate_block`); tiles or groups that
are not powers of two are read per weight. Index arithmetic is int32 below 2**31 values, int64 above.

Accumulation is fp32 throughout. ``dz`` is accumulated with fp32 atomics, so several kernel blocks,
several tiles sharing a slot and several modules can all add into the same slot. Block sizes, warps and
pipeline stages come from the launch table (``launch.py``), which ``hf-roast check-gpu`` compiles for real
GPU targets ahead of time (``compile_check.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from hf_roast.backends.geometry import Geometry  # absolute: the package may be imported under another name
from hf_roast.mapping import tiles_along
from hf_roast.vocab import MAPPER_IDS, SIGN_IDS

from .launch import Blocks, device_target, embedding_blocks, table_blocks
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


# --------------------------------------------------------------------------------------------------
# Block sizes: the launch table (``launch.py``), overridable (tests prove the result does not depend on it).
# --------------------------------------------------------------------------------------------------
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


INTERPRETER_TARGET = "sm_80"
"""The table the interpreter launches with (blocks never change results; tests force their own)."""


def target_of(t, target: str | None) -> str:
    """The launch table's target for tensor ``t``: given (the compile check), or its CUDA device's."""
    if target is not None:
        return target
    if INTERPRETED or t.device.type != "cuda":
        return INTERPRETER_TARGET
    return device_target(t.device.index if t.device.index is not None else torch.cuda.current_device())


def pick_blocks(rows: int, dtype: torch.dtype, *, family: str = "mm", hashed: bool = False,
                target: str = INTERPRETER_TARGET) -> Blocks:  # fmt: skip
    """The launch table's blocks for ``rows`` activation rows of ``dtype`` (or the forced ones)."""
    if _forced_blocks is not None:
        return _forced_blocks
    return table_blocks(target, family, rows, dtype != torch.float32, hashed)


# --------------------------------------------------------------------------------------------------
# Device functions.
# --------------------------------------------------------------------------------------------------
@triton.jit
def _index(x, WIDE: tl.constexpr):
    """z indices in int32 unless the sizes need int64 (``WIDE``): half the registers, exact below 2**31."""
    if WIDE:
        x = x.to(tl.int64)
    else:
        x = x.to(tl.int32)
    return x


@triton.jit
def _axes(a, b, A_AXIS: tl.constexpr):
    """1-D vectors ``a`` and ``b`` placed on a 2-D block: ``a`` along axis ``A_AXIS``, ``b`` along the other."""
    if A_AXIS == 0:
        a2, b2 = a[:, None], b[None, :]
    else:
        a2, b2 = a[None, :], b[:, None]
    return a2, b2


@triton.jit
def _cells(start, BLOCK: tl.constexpr, UNIT: tl.constexpr):
    """One representative index per cell of ``[start, start + BLOCK)``, cut into ceil(BLOCK / UNIT) equal cells.

    With powers of two and ``start`` a multiple of ``BLOCK``, each cell lies inside one aligned run of
    ``UNIT`` (a mapping tile's rows or columns, a quantisation group's), so a per-unit value is the same
    for the whole cell and is loaded once for it."""
    N_CELLS: tl.constexpr = (BLOCK + UNIT - 1) // UNIT
    return start + tl.arange(0, N_CELLS) * (BLOCK // N_CELLS)


@triton.jit
def _expand(v, B0: tl.constexpr, B1: tl.constexpr):
    """A [G0, G1] grid of per-cell values broadcast over the [B0, B1] block it tiles (cells of B0/G0 x B1/G1)."""
    G0: tl.constexpr = v.shape[0]
    G1: tl.constexpr = v.shape[1]
    return tl.reshape(tl.broadcast_to(v[:, None, :, None], (G0, B0 // G0, G1, B1 // G1)), (B0, B1))


@triton.jit
def _locate_block(
    rows, r0, c0, n_rows, n_cols, slot_ptr, scale_ptr, zs_ptr, inv_ptr, n_tile_cols, tile_offset, seg_start,
    seg_size, slot_a, slot_b, sign_a, sign_b,
    TR: tl.constexpr, TC: tl.constexpr, MAPPER: tl.constexpr, SIGN: tl.constexpr, BR: tl.constexpr,
    BC: tl.constexpr, R_AXIS: tl.constexpr, ROW_CELLS: tl.constexpr, TILE_GRID: tl.constexpr,
    WIDE: tl.constexpr, ZBITS: tl.constexpr, ZGROUP: tl.constexpr, HAS_SCALER: tl.constexpr,
    SCALER_UNIT: tl.constexpr,
):  # fmt: skip
    """Where the weights ``rows x [c0, c0 + BC)`` of a module live in z, as a block with the rows on axis
    ``R_AXIS``: (z index, lambda * sign [/ s_j with ``HAS_SCALER``], packed z's group scale, validity).

    ``rows`` holds BR row indices: the contiguous run from ``r0`` when ``ROW_CELLS`` (a GEMM block), else
    gathered ones (embedding ids). With ``TILE_GRID`` (tile mappers, power-of-two tile and group) every
    per-tile value (slot, scale, scaler) and every group scale is loaded once per cell of the tile or group
    grid and broadcast, instead of once per weight: a 32x32 tile has one of each.
    """
    cols = c0 + tl.arange(0, BC)
    r, c = _axes(_index(rows, WIDE), _index(cols, WIDE), R_AXIS)
    mask = (r < n_rows) & (c < n_cols)
    B0: tl.constexpr = BR if R_AXIS == 0 else BC
    B1: tl.constexpr = BC if R_AXIS == 0 else BR
    ntc = _index(n_tile_cols, WIDE)
    local_tile, element = tile_coordinates(r, c, ntc, TR, TC)
    zscale = 0.0
    if TILE_GRID:
        if ROW_CELLS:
            r_cells = _cells(r0, BR, TR)
        else:
            r_cells = rows
        rc, cc = _axes(_index(r_cells, WIDE), _index(_cells(c0, BC, TC), WIDE), R_AXIS)
        cell_tile, _ = tile_coordinates(rc, cc, ntc, TR, TC)
        cell_mask = (rc < n_rows) & (cc < n_cols)
        slot = tl.load(slot_ptr + cell_tile, mask=cell_mask, other=0)
        cell_scale = tl.load(scale_ptr + cell_tile, mask=cell_mask, other=0.0)
        if HAS_SCALER:  # a tile mapper's scaler has one entry per slot tile
            cell_scale = cell_scale * tl.load(inv_ptr + slot, mask=cell_mask, other=0.0)
        index = _expand(_index(slot, WIDE) * (TR * TC), B0, B1) + element
        scale = _expand(cell_scale, B0, B1)
        if ZBITS != 0:  # a group covers whole tile rows (ZGROUP >= TC) or a run of one row
            GROUP_ROWS: tl.constexpr = (ZGROUP + TC - 1) // TC
            GROUP_COLS: tl.constexpr = TC // ((TC + ZGROUP - 1) // ZGROUP)
            if ROW_CELLS:
                r_groups = _cells(r0, BR, GROUP_ROWS)
            else:
                r_groups = rows
            rg, cg = _axes(_index(r_groups, WIDE), _index(_cells(c0, BC, GROUP_COLS), WIDE), R_AXIS)
            g_tile, g_element = tile_coordinates(rg, cg, ntc, TR, TC)
            g_mask = (rg < n_rows) & (cg < n_cols)
            g_index = _index(tl.load(slot_ptr + g_tile, mask=g_mask, other=0), WIDE) * (TR * TC) + g_element
            zscale = _expand(tl.load(zs_ptr + group_of(g_index, ZGROUP), mask=g_mask, other=0.0), B0, B1)
    else:
        scale = tl.load(scale_ptr + local_tile, mask=mask, other=0.0)
        if MAPPER == HASHEDNET:
            virtual = virtual_index(
                local_tile.to(tl.int64), element.to(tl.int64), tile_offset.to(tl.int64), TR * TC
            )
            index = _index(
                hashednet_slot(
                    virtual, seg_start.to(tl.int64), seg_size.to(tl.int64), slot_a.to(tl.int64),
                    slot_b.to(tl.int64),
                ),
                WIDE,
            )  # fmt: skip
        else:
            index = _index(tl.load(slot_ptr + local_tile, mask=mask, other=0), WIDE) * (TR * TC) + element
        if HAS_SCALER:
            scale = scale * tl.load(inv_ptr + index // SCALER_UNIT, mask=mask, other=0.0)
        if ZBITS != 0:
            zscale = tl.load(zs_ptr + group_of(index, ZGROUP), mask=mask, other=0.0)
    if SIGN == ELEMENT_SIGN:  # x (+-1) is exact, so the order of the products does not change a bit
        virtual = virtual_index(
            local_tile.to(tl.int64), element.to(tl.int64), tile_offset.to(tl.int64), TR * TC
        )
        scale = scale * hash_sign(virtual, sign_a.to(tl.int64), sign_b.to(tl.int64)).to(tl.float32)
    index = tl.where(mask, index, 0)
    return index, scale, zscale, mask


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
def _tf32(x, ROUND: tl.constexpr):
    """fp32 ``x`` as a TF32 tensor-core operand (10 mantissa bits): rounded to nearest, ties away from zero,
    as ``cvt.rna.tf32.f32`` does (``ROUND``), or truncated, as an mma does with the low 13 bits of raw fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    if ROUND:
        bits = bits + 0x1000
    return (bits & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """acc + a @ b in fp32.

    The interpreter ignores ``input_precision`` and multiplies bf16 as raw integers, so under it (``EMULATE``)
    the operands are fp32 (products of half-precision values are exact in fp32: the same result) and the
    TF32 precisions are emulated as Triton lowers them on the GPU (read from its PTX): "tf32" hands the raw
    fp32 operands to the mma (truncated to TF32); "tf32x3" rounds each operand to a TF32 high part
    (``cvt.rna``), hands the remainder raw, and adds the three larger cross products. The interpreter's
    results then carry the GPU's operand rounding (not its summation order).
    """
    if EMULATE:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        if DOT_PRECISION == "tf32":
            acc = tl.dot(_tf32(a, False), _tf32(b, False), acc, input_precision="ieee")
        elif DOT_PRECISION == "tf32x3":
            a_hi = _tf32(a, True)
            b_hi = _tf32(b, True)
            acc = tl.dot(_tf32(a - a_hi, False), b_hi, acc, input_precision="ieee")
            acc = tl.dot(a_hi, _tf32(b - b_hi, False), acc, input_precision="ieee")
            acc = tl.dot(a_hi, b_hi, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _load_weight(
    z_ptr, index, scale, zscale, mask, OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr, ZBITS: tl.constexpr
):  # fmt: skip
    """lambda * sign * z[index] rounded like the PyTorch path: the product in z's dtype, then a cast.
    ``ZBITS`` 8 or 4: z is packed codes dequantised with their group's scale ``zscale`` (fp32); 0: floats."""
    zval = _load_z(z_ptr, index, zscale, mask, ZBITS)
    if zval.dtype == tl.float32:
        w = zval * scale
    else:  # torch multiplies two half tensors in fp32 and rounds the product to the half dtype
        w = zval.to(tl.float32) * _round_to(scale, zval.dtype, EMULATE).to(tl.float32)
        w = _round_to(w, zval.dtype, EMULATE).to(tl.float32)
    return _round_to(w, OUT_DTYPE, EMULATE)


@triton.jit
def _load_z(z_ptr, index, zscale, mask, ZBITS: tl.constexpr):
    """z[index]: as stored (floats), or a packed code times its group's scale, in registers (fp32)."""
    if ZBITS != 0:
        raw = tl.load(z_ptr + storage_index(index, ZBITS), mask=mask, other=0).to(index.dtype)
        zval = dequantize_value(code_of(raw, index, ZBITS).to(tl.float32), zscale)
    else:
        zval = tl.load(z_ptr + index, mask=mask, other=0.0)
    return zval


# --------------------------------------------------------------------------------------------------
# Linear: forward, dX, dz.
# --------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _linear_fwd_kernel(
    x_ptr, z_ptr, zs_ptr, slot_ptr, scale_ptr, bias_ptr, y_ptr, M, stride_xm, stride_ym,
    n_rows, n_cols, n_tile_cols, tile_offset, seg_start, seg_size, slot_a, slot_b, sign_a, sign_b,
    TR: tl.constexpr, TC: tl.constexpr, MAPPER: tl.constexpr, SIGN: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    ZBITS: tl.constexpr, ZGROUP: tl.constexpr, TILE_GRID: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[M, N] = x[M, K] @ W^T (+ b); W is ``n_rows (=N) x n_cols (=K)``, read from z block by block."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < n_cols),
            other=0.0,
        )
        # W^T block [BLOCK_K, BLOCK_N]: W's rows (output features n) on axis 1.
        index, scale, zscale, mask = _locate_block(
            offs_n, n0, k0, n_rows, n_cols, slot_ptr, scale_ptr, zs_ptr, scale_ptr, n_tile_cols, tile_offset,
            seg_start, seg_size, slot_a, slot_b, sign_a, sign_b, TR, TC, MAPPER, SIGN, BLOCK_N, BLOCK_K, 1, True,
            TILE_GRID, WIDE, ZBITS, ZGROUP, False, 1,
        )  # fmt: skip
        w_t = _load_weight(z_ptr, index, scale, zscale, mask, x.dtype, EMULATE, ZBITS)
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
    TILE_GRID: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dX[M, K] = dY[M, N] @ W[N, K], with the same tile reads as the forward."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, n_rows, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
            mask=(offs_m[:, None] < M) & (offs_n[None, :] < n_rows),
            other=0.0,
        )
        index, scale, zscale, mask = _locate_block(
            offs_n, n0, k0, n_rows, n_cols, slot_ptr, scale_ptr, zs_ptr, scale_ptr, n_tile_cols, tile_offset,
            seg_start, seg_size, slot_a, slot_b, sign_a, sign_b, TR, TC, MAPPER, SIGN, BLOCK_N, BLOCK_K, 0, True,
            TILE_GRID, WIDE, ZBITS, ZGROUP, False, 1,
        )  # fmt: skip
        w = _load_weight(z_ptr, index, scale, zscale, mask, dy.dtype, EMULATE, ZBITS)
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
    TILE_GRID: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dz[h(n, k)] += lambda * g * (dY^T X)[n, k] / s: one [BLOCK_N, BLOCK_K] block of dW, reduced over M
    in steps of BLOCK_M rows (its own blocks: the reduction wants a short M step, not the forward's)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    k0 = pid_k * BLOCK_K
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
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
    index, scale, _, mask = _locate_block(
        offs_n, n0, k0, n_rows, n_cols, slot_ptr, scale_ptr, scale_ptr, inv_ptr, n_tile_cols, tile_offset,
        seg_start, seg_size, slot_a, slot_b, sign_a, sign_b, TR, TC, MAPPER, SIGN, BLOCK_N, BLOCK_K, 0, True,
        TILE_GRID, WIDE, 0, 1, HAS_SCALER, SCALER_UNIT,
    )  # fmt: skip
    # relaxed: each add is independent (nothing is read back in this launch), so the cheaper `red` does
    tl.atomic_add(dz_ptr + index, acc * scale, mask=mask, sem="relaxed")


# --------------------------------------------------------------------------------------------------
# Embedding: gather and scatter of the looked-up rows only.
# --------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _embedding_fwd_kernel(
    ids_ptr, z_ptr, zs_ptr, slot_ptr, scale_ptr, out_ptr, n_ids,
    n_rows, n_cols, n_tile_cols, tile_offset, seg_start, seg_size, slot_a, slot_b, sign_a, sign_b,
    TR: tl.constexpr, TC: tl.constexpr, MAPPER: tl.constexpr, SIGN: tl.constexpr, EMULATE: tl.constexpr,
    ZBITS: tl.constexpr, ZGROUP: tl.constexpr, TILE_GRID: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_i = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c0 = pid_c * BLOCK_C
    offs_c = c0 + tl.arange(0, BLOCK_C)
    ids = tl.load(ids_ptr + offs_i, mask=offs_i < n_ids, other=n_rows)  # n_rows: masked out
    index, scale, zscale, mask = _locate_block(
        ids, 0, c0, n_rows, n_cols, slot_ptr, scale_ptr, zs_ptr, scale_ptr, n_tile_cols, tile_offset,
        seg_start, seg_size, slot_a, slot_b, sign_a, sign_b, TR, TC, MAPPER, SIGN, BLOCK_R, BLOCK_C, 0, False,
        TILE_GRID, WIDE, ZBITS, ZGROUP, False, 1,
    )  # fmt: skip
    zval = _load_z(z_ptr, index, zscale, mask, ZBITS).to(tl.float32)
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
    HAS_SCALER: tl.constexpr, SCALER_UNIT: tl.constexpr, TILE_GRID: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_i = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c0 = pid_c * BLOCK_C
    offs_c = c0 + tl.arange(0, BLOCK_C)
    ids = tl.load(ids_ptr + offs_i, mask=offs_i < n_ids, other=n_rows)
    index, scale, _, mask = _locate_block(
        ids, 0, c0, n_rows, n_cols, slot_ptr, scale_ptr, scale_ptr, inv_ptr, n_tile_cols, tile_offset,
        seg_start, seg_size, slot_a, slot_b, sign_a, sign_b, TR, TC, MAPPER, SIGN, BLOCK_R, BLOCK_C, 0, False,
        TILE_GRID, WIDE, 0, 1, HAS_SCALER, SCALER_UNIT,
    )  # fmt: skip
    grad = tl.load(grad_ptr + offs_i[:, None] * n_cols + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(dz_ptr + index, grad * scale, mask=mask, sem="relaxed")


INTERPRETED = type(_linear_fwd_kernel).__name__ == "InterpretedFunction"
"""True when TRITON_INTERPRET=1 was set before this module was imported: the kernels then run on CPU."""


# --------------------------------------------------------------------------------------------------
# Launchers (plain tensors in, tensors out; the custom ops in ``ops.py`` wrap these).
# --------------------------------------------------------------------------------------------------
FP32_PRECISIONS = ("tf32x3", "ieee", "tf32")
"""How tl.dot multiplies fp32 operands: three TF32 tensor-core products (about fp32's accuracy), CUDA-core
FMA (fp32 exactly), or one TF32 product (10-bit mantissas). docs/kernels.md has the measured errors."""
FP32_DEFAULT = "tf32x3"
"""fp32 activations with torch's TF32 switch off (torch's default): tf32x3, see :func:`_dot_precision`."""
_forced_precision: str | None = None


@contextmanager
def forced_fp32_precision(precision: str | None) -> Iterator[None]:
    """Run every fp32 launch inside the context with this ``tl.dot`` precision (measurements, tests)."""
    global _forced_precision
    if precision is not None and precision not in FP32_PRECISIONS:
        raise ValueError(f"precision must be one of {FP32_PRECISIONS}, got {precision!r}")
    previous, _forced_precision = _forced_precision, precision
    try:
        yield
    finally:
        _forced_precision = previous


def _dot_precision(dtype: torch.dtype) -> str:
    """The ``tl.dot`` precision of fp32 operands (half-precision ones ignore it).

    torch's TF32 switch on: "tf32", as ``nn.Linear`` then does. Off (torch's default): "tf32x3", not "ieee":
    ieee lowers tl.dot to CUDA-core FMA, whose blocks either spill registers or starve the GPU, while tf32x3
    runs on the tensor cores at fp32-class accuracy (docs/kernels.md: measured against the PyTorch path).
    """
    if dtype != torch.float32:
        return "ieee"
    if _forced_precision is not None:
        return _forced_precision
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else FP32_DEFAULT


def _table(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A placeholder pointer for an absent table (the kernel never reads it when its flag is off)."""
    return t if t is not None else like


def _z_args(z: torch.Tensor, packed: tuple[torch.Tensor, int, int] | None) -> dict:
    """z's pointers and format: ``packed`` is (group scales, bits, group size) when z holds packed codes."""
    if packed is None:
        return dict(z_ptr=z, zs_ptr=z, ZBITS=0, ZGROUP=1)
    scales, bits, group = packed
    return dict(z_ptr=z, zs_ptr=scales, ZBITS=bits, ZGROUP=group)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the jitted kernel, its grid and every argument (launch options included).

    The launchers build these and run them; the compile check builds the very same ones from abstract
    tensors and compiles them ahead of time, so it covers exactly what dispatch launches.
    """

    kernel: object
    grid: tuple[int, ...]
    args: dict

    def run(self) -> None:
        self.kernel[self.grid](**self.args)


def _options(b: Blocks) -> dict:
    return dict(num_warps=b.num_warps, num_stages=b.num_stages)


def _pow2(v: int) -> bool:
    return v > 0 and not v & (v - 1)


WIDE_LIMIT = 2**31
"""z indices, tile indices and virtual offsets from this size up take the int64 kernels."""


def _layout_args(geo: Geometry, packed, num_values: int) -> dict:
    """``TILE_GRID``: per-tile values on the tile grid (tile mappers, power-of-two tile and z group); else per
    weight. ``WIDE``: int64 index arithmetic, when z or the module's padded tiles reach 2**31 values."""
    tile_grid = geo.tiled and _pow2(geo.tile_rows) and _pow2(geo.tile_cols)
    if packed is not None:
        tile_grid = tile_grid and _pow2(packed[2])
    padded = tiles_along(geo.rows, geo.tile_rows) * geo.n_tile_cols * geo.tile_rows * geo.tile_cols
    return dict(TILE_GRID=tile_grid, WIDE=max(num_values, padded) >= WIDE_LIMIT)


def _z_values(z, packed) -> int:
    """How many values z holds (a 4-bit z stores two per byte)."""
    return z.numel() * (2 if packed is not None and packed[1] == 4 else 1)


def linear_forward_launch(
    x2, z, bias, tile_slot, tile_scale, geo: Geometry, packed, y, target: str | None = None
) -> Launch:  # fmt: skip
    """The forward's launch for a 2-D, row-contiguous x2 into y (``packed``: see :func:`_z_args`)."""
    m = x2.shape[0]
    b = pick_blocks(m, x2.dtype, hashed=geo.hashed, target=target_of(x2, target))
    grid = (triton.cdiv(m, b.m), triton.cdiv(geo.rows, b.n))
    return Launch(_linear_fwd_kernel, grid, dict(
        x_ptr=x2, slot_ptr=_table(tile_slot, tile_scale), scale_ptr=tile_scale, bias_ptr=_table(bias, tile_scale),
        y_ptr=y, M=m, stride_xm=x2.stride(0), stride_ym=y.stride(0), **_z_args(z, packed),
        **geo.kernel_args(), HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(x2.dtype), EMULATE=INTERPRETED,
        **_layout_args(geo, packed, _z_values(z, packed)), BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_K=b.k, **_options(b),
    ))  # fmt: skip


def linear_grad_input_launch(
    dy2, z, tile_slot, tile_scale, geo: Geometry, packed, dx, target: str | None = None
) -> Launch:  # fmt: skip
    m = dy2.shape[0]
    b = pick_blocks(m, dy2.dtype, hashed=geo.hashed, target=target_of(dy2, target))
    # dX's tile is [rows, in features] reduced over out features: the forward's tile, with n and k swapped
    b = replace(b, n=b.k, k=b.n)
    grid = (triton.cdiv(m, b.m), triton.cdiv(geo.cols, b.k))
    return Launch(_linear_grad_input_kernel, grid, dict(
        dy_ptr=dy2, slot_ptr=_table(tile_slot, tile_scale), scale_ptr=tile_scale, dx_ptr=dx, M=m,
        stride_dym=dy2.stride(0), stride_dxm=dx.stride(0), **_z_args(z, packed), **geo.kernel_args(),
        DOT_PRECISION=_dot_precision(dy2.dtype), EMULATE=INTERPRETED, **_layout_args(geo, packed, _z_values(z, packed)),
        BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_K=b.k, **_options(b),
    ))  # fmt: skip


def linear_grad_z_launch(
    dy2, x2, tile_slot, tile_scale, scaler_inv, geo: Geometry, dz, target: str | None = None
) -> Launch:  # fmt: skip
    m = dy2.shape[0]
    b = pick_blocks(m, dy2.dtype, family="grad_z", target=target_of(dy2, target))
    # The grid runs over W's blocks; each reduces over all rows, so M blocks stay moderate.
    grid = (triton.cdiv(geo.rows, b.n), triton.cdiv(geo.cols, b.k))
    return Launch(_linear_grad_z_kernel, grid, dict(
        dy_ptr=dy2, x_ptr=x2, slot_ptr=_table(tile_slot, tile_scale), scale_ptr=tile_scale,
        inv_ptr=_table(scaler_inv, tile_scale), dz_ptr=dz, M=m, stride_dym=dy2.stride(0), stride_xm=x2.stride(0),
        **geo.kernel_args(), HAS_SCALER=scaler_inv is not None, SCALER_UNIT=geo.scaler_unit,
        DOT_PRECISION=_dot_precision(dy2.dtype), EMULATE=INTERPRETED, **_layout_args(geo, None, dz.numel()),
        BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_K=b.k, **_options(b),
    ))  # fmt: skip


def _embedding_blocks(n_cols: int) -> tuple[int, int]:
    forced = _forced_blocks
    if forced is not None:
        return forced.m, forced.k
    return embedding_blocks(n_cols)


def embedding_forward_launch(flat, z, tile_slot, tile_scale, geo: Geometry, packed, out) -> Launch:
    block_r, block_c = _embedding_blocks(geo.cols)
    grid = (triton.cdiv(flat.shape[0], block_r), triton.cdiv(geo.cols, block_c))
    return Launch(_embedding_fwd_kernel, grid, dict(
        ids_ptr=flat, slot_ptr=_table(tile_slot, tile_scale), scale_ptr=tile_scale, out_ptr=out, n_ids=flat.shape[0],
        **_z_args(z, packed), **geo.kernel_args(), EMULATE=INTERPRETED, **_layout_args(geo, packed, _z_values(z, packed)),
        BLOCK_R=block_r, BLOCK_C=block_c,
    ))  # fmt: skip


def embedding_grad_z_launch(flat, grad2, tile_slot, tile_scale, scaler_inv, geo: Geometry, dz) -> Launch:
    block_r, block_c = _embedding_blocks(geo.cols)
    grid = (triton.cdiv(flat.shape[0], block_r), triton.cdiv(geo.cols, block_c))
    return Launch(_embedding_grad_z_kernel, grid, dict(
        ids_ptr=flat, grad_ptr=grad2, slot_ptr=_table(tile_slot, tile_scale), scale_ptr=tile_scale,
        inv_ptr=_table(scaler_inv, tile_scale), dz_ptr=dz, n_ids=flat.shape[0], **geo.kernel_args(),
        HAS_SCALER=scaler_inv is not None, SCALER_UNIT=geo.scaler_unit, **_layout_args(geo, None, dz.numel()),
        BLOCK_R=block_r, BLOCK_C=block_c,
    ))  # fmt: skip


def linear_forward(
    x2: torch.Tensor, z: torch.Tensor, bias: torch.Tensor | None, tile_slot: torch.Tensor | None,
    tile_scale: torch.Tensor, geo: Geometry, packed: tuple[torch.Tensor, int, int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """y = x2 @ W^T (+ b) for a 2-D, row-contiguous x2 (``packed``: z is codes, see :func:`_z_args`)."""
    m = x2.shape[0]
    y = torch.empty((m, geo.rows), dtype=x2.dtype, device=x2.device)
    if m:
        linear_forward_launch(x2, z, bias, tile_slot, tile_scale, geo, packed, y).run()
    return y


def linear_grad_input(
    dy2: torch.Tensor, z: torch.Tensor, tile_slot: torch.Tensor | None, tile_scale: torch.Tensor,
    geo: Geometry, out_dtype: torch.dtype, packed: tuple[torch.Tensor, int, int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """dX = dY @ W for a 2-D, row-contiguous dY."""
    m = dy2.shape[0]
    dx = torch.empty((m, geo.cols), dtype=out_dtype, device=dy2.device)
    if m:
        linear_grad_input_launch(dy2, z, tile_slot, tile_scale, geo, packed, dx).run()
    return dx


def linear_grad_z(
    dy2: torch.Tensor, x2: torch.Tensor, tile_slot: torch.Tensor | None, tile_scale: torch.Tensor,
    scaler_inv: torch.Tensor | None, geo: Geometry, num_slots: int,
) -> torch.Tensor:  # fmt: skip
    """This module's fp32 dz (length ``num_slots``), reduced over the rows of dY and X."""
    dz = torch.zeros(num_slots, dtype=torch.float32, device=dy2.device)
    if dy2.shape[0]:
        linear_grad_z_launch(dy2, x2, tile_slot, tile_scale, scaler_inv, geo, dz).run()
    return dz


def embedding_forward(
    ids: torch.Tensor, z: torch.Tensor, tile_slot: torch.Tensor | None, tile_scale: torch.Tensor,
    geo: Geometry, dtype: torch.dtype, packed: tuple[torch.Tensor, int, int] | None = None,
) -> torch.Tensor:  # fmt: skip
    flat = ids.reshape(-1).contiguous()
    out = torch.empty((flat.numel(), geo.cols), dtype=dtype, device=z.device)
    if flat.numel():
        embedding_forward_launch(flat, z, tile_slot, tile_scale, geo, packed, out).run()
    return out.view(*ids.shape, geo.cols)


def embedding_grad_z(
    ids: torch.Tensor, grad: torch.Tensor, tile_slot: torch.Tensor | None, tile_scale: torch.Tensor,
    scaler_inv: torch.Tensor | None, geo: Geometry, num_slots: int,
) -> torch.Tensor:  # fmt: skip
    flat = ids.reshape(-1).contiguous()
    dz = torch.zeros(num_slots, dtype=torch.float32, device=grad.device)
    if flat.numel():
        grad2 = grad.reshape(flat.numel(), geo.cols).contiguous()
        embedding_grad_z_launch(flat, grad2, tile_slot, tile_scale, scaler_inv, geo, dz).run()
    return dz
