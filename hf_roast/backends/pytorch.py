"""The PyTorch backend: materialise one module's weight at a time, never keep it.

Forward builds ``W`` from z into a reused scratch buffer, runs the matmul and drops ``W``; backward
rebuilds it for ``dX`` and scatters ``dY^T X`` back into z. Nothing W-sized is saved for backward,
and no W-sized index is ever built on the tile mappers (the tables are W/T entries).

This backend runs every call (any device, dtype, gradient or compiler), so it has no gate. It imports no
other backend: where another one can build W faster (the CPU backend's one-pass loop), dispatch hands
its builder down as a :class:`NativeWeight`, and the PyTorch ops build W wherever it declines.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from hf_roast.mapping import LayerMapping
from hf_roast.quant import QuantizedZ, fake_quantize_at, fake_quantize_groups, group_scales


class _Scratch(threading.local):
    """Per-thread buffers reused across layers: fresh W-sized pages from the OS cost more than the copy."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, key: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        slot = (key, dtype, device)
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self.buffers[slot] = buf
        return buf[:numel]


_scratch = _Scratch()


def clear_scratch() -> None:
    """Free the reused buffers (e.g. after inference, or before measuring memory)."""
    _scratch.buffers.clear()


def _use_scratch() -> bool:
    """Whether to write into the reused per-thread buffers.

    Not while ``torch.compile`` traces: the buffers are global mutable state (dynamo would lift them into
    graph inputs and guard on them), and functionalisation rewrites ``out=`` ops out-of-place, so an
    ``out=`` written through a permuted input comes back with the input's strides and the following
    ``view`` fails ("Cannot view a tensor with shape ... as a tensor with shape ..."). Inductor plans its
    own buffers, so the compiled path uses plain out-of-place ops instead.
    """
    return not torch.compiler.is_compiling()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gradients of z accumulate in fp32 at least (fp64 stays fp64): half-precision sums lose slots' updates."""
    return torch.promote_types(dtype, torch.float32)


def _padded_shape(layer_map: LayerMapping) -> tuple[int, int, int, int]:
    tr, tc = layer_map.plan.tile
    return (
        layer_map.spec.n_tile_rows(layer_map.plan.tile),
        tr,
        layer_map.spec.n_tile_cols(layer_map.plan.tile),
        tc,
    )


def values_at(z: torch.Tensor | QuantizedZ, layer_map: LayerMapping, index: torch.Tensor) -> torch.Tensor:
    """z[index] as the layer reads it: dequantised (packed z), through the grid (QAT master), or as stored."""
    if isinstance(z, QuantizedZ):
        return z.values_at(index)
    if layer_map.fake_quant is not None:
        bits, group = layer_map.fake_quant
        return fake_quantize_at(z, index, group_scales(z, bits, group), bits, group).to(z.dtype)
    return z[index]


def gather_tiles(
    z: torch.Tensor | QuantizedZ, layer_map: LayerMapping, tile_numel: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The layer's slot tiles ``(n_tiles, T)``, in z's dtype (fp32 for a packed z), dequantised while read:
    only this layer's tiles are ever built, never a dequantised copy of z."""
    if isinstance(z, QuantizedZ):
        return z.tiles(layer_map.tile_slot, tile_numel)
    if out is None:
        tiles = z.view(-1, tile_numel).index_select(0, layer_map.tile_slot)
    else:
        tiles = torch.index_select(z.view(-1, tile_numel), 0, layer_map.tile_slot, out=out)
    if layer_map.fake_quant is not None:
        tiles = fake_quantize_groups(tiles, *layer_map.fake_quant).to(z.dtype)
    return tiles


def read_dtype(z: torch.Tensor | QuantizedZ) -> torch.dtype:
    """The dtype the paths read z's values in: its own, or fp32 for packed integers."""
    return torch.float32 if isinstance(z, QuantizedZ) else z.dtype


@dataclass(frozen=True)
class NativeWeight:
    """Another backend's build of W, the same values as this path's ops in one pass, handed down by
    dispatch (:func:`hf_roast.backends.dispatch.native_weight`) where the resolved backend allows it.

    ``reason(z, layer_map, dtype)`` is that backend's gate (None: it can build this W); ``build(z,
    layer_map, out)`` writes W into the contiguous ``rows x cols`` tensor ``out`` of that dtype."""

    reason: Callable[[torch.Tensor | QuantizedZ, LayerMapping, torch.dtype], str | None]
    build: Callable[[torch.Tensor | QuantizedZ, LayerMapping, torch.Tensor], torch.Tensor]


def materialize_weight(
    z: torch.Tensor | QuantizedZ,
    layer_map: LayerMapping,
    dtype: torch.dtype,
    *,
    scratch: bool = True,
    native: NativeWeight | None = None,
) -> torch.Tensor:
    """The module's dense ``rows x cols`` weight in ``dtype``. With ``scratch`` it lives in a reused buffer.

    With ``native``, W is built by that builder wherever its gate allows (same values), else by PyTorch ops."""
    spec, plan = layer_map.spec, layer_map.plan
    if native is not None and native.reason(z, layer_map, dtype) is None:
        if scratch:
            out = _scratch.get("weight", spec.rows * spec.cols, dtype, z.device)
        else:
            out = torch.empty(spec.rows * spec.cols, dtype=dtype, device=z.device)
        return native.build(z, layer_map, out.view(spec.rows, spec.cols))
    zdt = read_dtype(z)
    if not plan.is_tiled:
        rows = torch.arange(spec.rows, device=z.device)
        index, sign = plan.element_index(spec, rows)
        return (values_at(z, layer_map, index) * element_scale(layer_map, rows, sign).to(zdt)).to(dtype)
    n_tr, tr, n_tc, tc = _padded_shape(layer_map)
    t = tr * tc
    n_tiles = n_tr * n_tc
    if not _use_scratch():
        tiles = gather_tiles(z, layer_map, t)
        if plan.sign == "element":
            tiles = tiles * plan.tile_element_signs(spec, z.device).to(zdt)
        scale = layer_map.tile_scale.to(zdt).view(n_tr, n_tc, 1, 1)
        w = (
            (tiles.view(n_tr, n_tc, tr, tc) * scale)
            .to(dtype)
            .permute(0, 2, 1, 3)
            .reshape(n_tr * tr, n_tc * tc)
        )
        return w[: spec.rows, : spec.cols] if w.shape != (spec.rows, spec.cols) else w
    get = _scratch.get if scratch else (lambda key, numel, dt, dev: torch.empty(numel, dtype=dt, device=dev))
    if isinstance(z, QuantizedZ):
        tiles = gather_tiles(z, layer_map, t)
    else:
        tiles = gather_tiles(z, layer_map, t, out=get("tiles", n_tiles * t, zdt, z.device).view(n_tiles, t))
    if plan.sign == "element":
        tiles.mul_(plan.tile_element_signs(spec, z.device).to(zdt))
    w = get("weight", n_tiles * t, dtype, z.device).view(n_tr, tr, n_tc, tc)
    # One pass: scale by lambda * tile sign, move tiles into row-major W, cast to the activation dtype.
    torch.mul(
        tiles.view(n_tr, n_tc, tr, tc).permute(0, 2, 1, 3),
        layer_map.tile_scale.to(zdt).view(n_tr, 1, n_tc, 1),
        out=w,
    )
    w = w.view(n_tr * tr, n_tc * tc)
    if w.shape != (spec.rows, spec.cols):
        w = w[: spec.rows, : spec.cols]
    return w


def element_scale(layer_map: LayerMapping, rows: torch.Tensor, sign: torch.Tensor | None) -> torch.Tensor:
    """lambda * sign of every element of the given rows, fp32 ``(*rows.shape, cols)``."""
    local_tile, _ = layer_map.plan.tile_coordinates(layer_map.spec, rows)
    scale = layer_map.tile_scale[local_tile]
    if sign is not None:
        scale = scale * sign
    return scale


def mapping_adjoint(
    grad_w: torch.Tensor, layer_map: LayerMapping, num_slots: int, dz: torch.Tensor | None = None
) -> torch.Tensor:
    """The adjoint of the mapping ``z -> W`` applied to one module's W-shaped tensor:
    ``dz[h(i)] += lambda * g(i) * dW[i] / s_h(i)`` (``1 / s`` only where the layer map carries the gradient
    scaler), accumulated in fp32 (into ``dz`` when given, e.g. over the row blocks of one module).

    Backward uses it for dz; the least-squares initialisation for its right-hand side (the adjoint of the
    dense weights) and its normal equations' diagonal (the adjoint of the importances, unsigned)."""
    spec, plan = layer_map.spec, layer_map.plan
    acc = accumulation_dtype(grad_w.dtype)
    if dz is None:
        dz = torch.zeros(num_slots, dtype=acc, device=grad_w.device)
    grad_w = grad_w.to(acc)
    if not plan.is_tiled:
        rows = torch.arange(spec.rows, device=grad_w.device)
        index, sign = plan.element_index(spec, rows)
        contrib = grad_w * element_scale(layer_map, rows, sign)
        if layer_map.scaler_inv is not None:
            contrib = contrib * layer_map.scaler_inv[index]
        dz.index_add_(0, index.flatten(), contrib.flatten())
        return dz
    n_tr, tr, n_tc, tc = _padded_shape(layer_map)
    t = tr * tc
    if grad_w.shape != (n_tr * tr, n_tc * tc):
        grad_w = F.pad(grad_w, (0, n_tc * tc - spec.cols, 0, n_tr * tr - spec.rows))
    scale = layer_map.tile_scale
    if layer_map.scaler_inv is not None:
        scale = scale * layer_map.scaler_inv[layer_map.tile_slot]
    if not _use_scratch():
        tiles = (grad_w.view(n_tr, tr, n_tc, tc).permute(0, 2, 1, 3) * scale.view(n_tr, n_tc, 1, 1)).reshape(
            n_tr * n_tc, t
        )
        if plan.sign == "element":
            tiles = tiles * plan.tile_element_signs(spec, grad_w.device)
        return dz.view(-1, t).index_add(0, layer_map.tile_slot, tiles).view(-1)
    # One pass: scale and reorder into a contiguous tile-major buffer (a plain product would keep the
    # permuted layout and need a second, W-sized copy to flatten). In backward the "tiles" buffer is
    # free again once W has been used, so this reuses it rather than allocating.
    tiles = _scratch.get("tiles", n_tr * n_tc * t, acc, grad_w.device).view(n_tr, n_tc, tr, tc)
    torch.mul(grad_w.view(n_tr, tr, n_tc, tc).permute(0, 2, 1, 3), scale.view(n_tr, n_tc, 1, 1), out=tiles)
    tiles = tiles.view(n_tr * n_tc, t)
    if plan.sign == "element":
        tiles.mul_(plan.tile_element_signs(spec, grad_w.device))
    dz.view(-1, t).index_add_(0, layer_map.tile_slot, tiles)
    return dz


def _weight_grad(gy: torch.Tensor, x2: torch.Tensor, layer_map: LayerMapping) -> torch.Tensor:
    """dW = dY^T X. When W fills whole tiles it goes into the "weight" scratch buffer, free again once
    dX is done: a fresh W-sized tensor per backward costs page faults on every step."""
    n_tr, tr, n_tc, tc = _padded_shape(layer_map)
    rows, cols = layer_map.spec.rows, layer_map.spec.cols
    if (rows, cols) != (n_tr * tr, n_tc * tc) or not _use_scratch():
        return gy.t().mm(x2)
    return torch.mm(gy.t(), x2, out=_scratch.get("weight", rows * cols, gy.dtype, gy.device).view(rows, cols))


ROW_BLOCK_WEIGHTS = 1 << 22
"""At most this many weights (16 MiB in fp32) of one W are materialised at a time: a large W (an output
layer of 32k x 768, a 4096-wide MLP) is built and used in blocks of whole tile rows, so the reused
buffers stay this small instead of growing to the largest W of the model."""


def row_blocks(layer_map: LayerMapping) -> list[tuple[int, int, LayerMapping]]:
    """``(first row, end row, mapping)`` of W's blocks of whole tile rows, each <= ROW_BLOCK_WEIGHTS.

    A block's mapping is the module's own, restricted to its tiles: the same tables sliced, and a spec
    whose tile offset starts at the block's first tile, so every formula (slots, signs, scales) reads
    exactly what it reads for the whole W. One block when W is small, on hashednet, or while compiling.
    """
    spec = layer_map.spec
    n_tr, tr, n_tc, tc = _padded_shape(layer_map)
    step = max(1, ROW_BLOCK_WEIGHTS // (tr * n_tc * tc))
    if not layer_map.plan.is_tiled or n_tr <= step or not _use_scratch():
        return [(0, spec.rows, layer_map)]
    blocks = []
    for a in range(0, n_tr, step):
        b = min(n_tr, a + step)
        first, end = a * tr, min(spec.rows, b * tr)
        sub = replace(spec, rows=end - first, tile_offset=spec.tile_offset + a * n_tc)
        tables = slice(a * n_tc, b * n_tc)
        blocks.append(
            (
                first,
                end,
                replace(
                    layer_map,
                    spec=sub,
                    tile_slot=layer_map.tile_slot[tables],
                    tile_scale=layer_map.tile_scale[tables],
                ),
            )
        )
    return blocks


def _save_x_and_z(ctx, x: torch.Tensor, z: torch.Tensor | QuantizedZ) -> None:
    """A packed z is no autograd input (it gets no gradient): it is kept on ctx, not saved as a tensor."""
    if isinstance(z, QuantizedZ):
        ctx.save_for_backward(x)
        ctx.packed_z = z
    else:
        ctx.save_for_backward(x, z)
        ctx.packed_z = None


def _saved_x_and_z(ctx):
    saved = ctx.saved_tensors
    return (saved[0], ctx.packed_z) if ctx.packed_z is not None else saved


class RoastLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W read from z; saves x only, rebuilds W in backward (by row blocks for a large W).

    ``native`` (optional, see :class:`NativeWeight`) builds W in forward and backward where it can."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        z: torch.Tensor,
        bias: torch.Tensor | None,
        layer_map: LayerMapping,
        native: NativeWeight | None = None,
    ):
        blocks = row_blocks(layer_map)
        b = bias.to(x.dtype) if bias is not None else None
        if len(blocks) == 1:
            y = F.linear(x, materialize_weight(z, layer_map, x.dtype, native=native), b)
        else:
            x2 = x.reshape(-1, x.shape[-1])
            y = x2.new_empty(x2.shape[0], layer_map.spec.rows)
            for first, end, sub in blocks:
                y[:, first:end] = F.linear(
                    x2,
                    materialize_weight(z, sub, x.dtype, native=native),
                    None if b is None else b[first:end],
                )
            y = y.view(*x.shape[:-1], layer_map.spec.rows)
        _save_x_and_z(ctx, x, z)
        ctx.layer_map = layer_map
        ctx.native = native
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, z = _saved_x_and_z(ctx)
        layer_map: LayerMapping = ctx.layer_map
        grad_x = grad_z = grad_b = None
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        blocks = row_blocks(layer_map)
        if ctx.needs_input_grad[0]:
            for first, end, sub in blocks:
                part = gy[:, first:end] @ materialize_weight(z, sub, grad_y.dtype, native=ctx.native)
                grad_x = part if grad_x is None else grad_x.add_(part)
            grad_x = grad_x.view(*grad_y.shape[:-1], layer_map.spec.cols).to(x.dtype)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            acc = accumulation_dtype(gy.dtype)
            x2, gy_acc = x2.to(acc), gy.to(acc)
            for first, end, sub in blocks:
                grad_w = _weight_grad(gy_acc[:, first:end], x2, sub)
                grad_z = mapping_adjoint(grad_w, sub, z.numel(), grad_z)
            grad_z = grad_z.to(z.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = gy.to(accumulation_dtype(gy.dtype)).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_z, grad_b, None, None


class RoastEmbeddingFunction(torch.autograd.Function):
    """Gathers only the looked-up rows from z; backward scatters into those slots only."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, z: torch.Tensor, layer_map: LayerMapping, dtype: torch.dtype):
        index, sign = layer_map.plan.element_index(layer_map.spec, ids, layer_map.tile_slot)
        scale = element_scale(layer_map, ids.to(torch.int64), sign)
        out = (values_at(z, layer_map, index) * scale).to(dtype)
        _save_x_and_z(ctx, ids, z)
        ctx.layer_map = layer_map
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        ids, z = _saved_x_and_z(ctx)
        layer_map: LayerMapping = ctx.layer_map
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        index, sign = layer_map.plan.element_index(layer_map.spec, ids, layer_map.tile_slot)
        acc = accumulation_dtype(grad_out.dtype)
        contrib = grad_out.to(acc) * element_scale(layer_map, ids.to(torch.int64), sign).to(acc)
        if layer_map.scaler_inv is not None:
            contrib = contrib * layer_map.scaler_inv[index // layer_map.plan.scaler_unit()]
        dz = torch.zeros(z.numel(), dtype=acc, device=z.device)
        dz.index_add_(0, index.flatten(), contrib.flatten())
        return None, dz.to(z.dtype), None, None
