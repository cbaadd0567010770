"""The Triton kernels as ``torch.library`` custom ops, with autograd and fake (meta) implementations.

Registered ops (namespace ``hf_roast``), so that ``torch.compile`` traces them as single nodes without
graph breaks and the meta device / FakeTensor can infer their shapes:

* ``roast_linear(x, z, bias, tile_slot, tile_scale, scaler_inv, geometry) -> y`` (differentiable in x,
  z and bias), with its two backward ops ``roast_linear_grad_input`` and ``roast_linear_grad_z``;
* ``roast_embedding(ids, z, tile_slot, tile_scale, scaler_inv, geometry, dtype) -> out`` (differentiable
  in z), with ``roast_embedding_grad_z``;
* ``roast_linear_packed`` / ``roast_linear_packed_grad_input`` / ``roast_embedding_packed``: the same reads
  from a packed z (``RoastConfig.z_bits`` 8 or 4: integer codes and group scales, dequantised in registers;
  ``zformat`` is ``[bits, group_size]``). A packed z is no parameter, so only x and the bias get gradients.

``geometry`` is :class:`~hf_roast.backends.geometry.Geometry` as a list of ints: custom ops take
tensors and scalars, not Python objects. Registration runs once per process, on first import of this
module, and is skipped when the ops already exist (e.g. the same file imported again under another
module name), so a second import can never fail or shadow the first.
"""

import torch

from hf_roast.backends.geometry import Geometry, geometry_of
from hf_roast.backends.triton.available import triton_unavailable_reason
from hf_roast.mapping import LayerMapping
from hf_roast.quant import QuantizedZ

from . import roast_matmul as rm

NAMESPACE = "hf_roast"

_SCHEMAS = {
    "roast_linear": "(Tensor x, Tensor z, Tensor? bias, Tensor? tile_slot, Tensor tile_scale, Tensor? scaler_inv, "
    "int[] geometry) -> Tensor",
    "roast_linear_grad_input": "(Tensor grad_y, Tensor z, Tensor? tile_slot, Tensor tile_scale, int[] geometry, "
    "ScalarType out_dtype) -> Tensor",
    "roast_linear_grad_z": "(Tensor grad_y, Tensor x, Tensor z, Tensor? tile_slot, Tensor tile_scale, "
    "Tensor? scaler_inv, int[] geometry) -> Tensor",
    "roast_embedding": "(Tensor ids, Tensor z, Tensor? tile_slot, Tensor tile_scale, Tensor? scaler_inv, "
    "int[] geometry, ScalarType dtype) -> Tensor",
    "roast_embedding_grad_z": "(Tensor ids, Tensor grad, Tensor z, Tensor? tile_slot, Tensor tile_scale, "
    "Tensor? scaler_inv, int[] geometry) -> Tensor",
    "roast_linear_packed": "(Tensor x, Tensor codes, Tensor scales, Tensor? bias, Tensor? tile_slot, "
    "Tensor tile_scale, int[] geometry, int[] zformat) -> Tensor",
    "roast_linear_packed_grad_input": "(Tensor grad_y, Tensor codes, Tensor scales, Tensor? tile_slot, "
    "Tensor tile_scale, int[] geometry, int[] zformat, ScalarType out_dtype) -> Tensor",
    "roast_embedding_packed": "(Tensor ids, Tensor codes, Tensor scales, Tensor? tile_slot, Tensor tile_scale, "
    "int[] geometry, int[] zformat, ScalarType dtype) -> Tensor",
}


def ops_registered() -> bool:
    """True when every ``hf_roast::`` kernel op exists in this process."""
    namespace = getattr(torch.ops, NAMESPACE)
    return all(hasattr(namespace, name) for name in _SCHEMAS)


# --------------------------------------------------------------------------------------------------
# Real implementations (run the kernels).
# --------------------------------------------------------------------------------------------------
def _rows2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


def _linear_impl(x, z, bias, tile_slot, tile_scale, scaler_inv, geometry):
    geo = Geometry.from_list(geometry)
    y2 = rm.linear_forward(_rows2d(x), z, bias, tile_slot, tile_scale, geo)
    return y2.view(*x.shape[:-1], geo.rows)


def _linear_grad_input_impl(grad_y, z, tile_slot, tile_scale, geometry, out_dtype):
    geo = Geometry.from_list(geometry)
    dx2 = rm.linear_grad_input(_rows2d(grad_y), z, tile_slot, tile_scale, geo, out_dtype)
    return dx2.view(*grad_y.shape[:-1], geo.cols)


def _linear_grad_z_impl(grad_y, x, z, tile_slot, tile_scale, scaler_inv, geometry):
    geo = Geometry.from_list(geometry)
    return rm.linear_grad_z(_rows2d(grad_y), _rows2d(x), tile_slot, tile_scale, scaler_inv, geo, z.numel())


def _check_ids(ids, geo: Geometry) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= geo.rows):
        raise IndexError(
            f"Embedding ids must lie in [0, {geo.rows}); got values in [{int(ids.min())}, {int(ids.max())}]. "
            "Check the tokenizer matches the model's vocabulary size."
        )


def _embedding_impl(ids, z, tile_slot, tile_scale, scaler_inv, geometry, dtype):
    geo = Geometry.from_list(geometry)
    _check_ids(ids, geo)
    return rm.embedding_forward(ids, z, tile_slot, tile_scale, geo, dtype)


def _packed(scales, zformat) -> tuple[torch.Tensor, int, int]:
    bits, group = (int(v) for v in zformat)
    return scales, bits, group


def _linear_packed_impl(x, codes, scales, bias, tile_slot, tile_scale, geometry, zformat):
    geo = Geometry.from_list(geometry)
    y2 = rm.linear_forward(_rows2d(x), codes, bias, tile_slot, tile_scale, geo, _packed(scales, zformat))
    return y2.view(*x.shape[:-1], geo.rows)


def _linear_packed_grad_input_impl(
    grad_y, codes, scales, tile_slot, tile_scale, geometry, zformat, out_dtype
):
    geo = Geometry.from_list(geometry)
    dx2 = rm.linear_grad_input(
        _rows2d(grad_y), codes, tile_slot, tile_scale, geo, out_dtype, _packed(scales, zformat)
    )
    return dx2.view(*grad_y.shape[:-1], geo.cols)


def _embedding_packed_impl(ids, codes, scales, tile_slot, tile_scale, geometry, zformat, dtype):
    geo = Geometry.from_list(geometry)
    _check_ids(ids, geo)
    return rm.embedding_forward(ids, codes, tile_slot, tile_scale, geo, dtype, _packed(scales, zformat))


def _embedding_grad_z_impl(ids, grad, z, tile_slot, tile_scale, scaler_inv, geometry):
    return rm.embedding_grad_z(
        ids, grad, tile_slot, tile_scale, scaler_inv, Geometry.from_list(geometry), z.numel()
    )


# --------------------------------------------------------------------------------------------------
# Fake implementations: shapes and dtypes only (meta device, FakeTensor, torch.compile tracing).
# --------------------------------------------------------------------------------------------------
def _linear_fake(x, z, bias, tile_slot, tile_scale, scaler_inv, geometry):
    return x.new_empty((*x.shape[:-1], geometry[0]))


def _linear_grad_input_fake(grad_y, z, tile_slot, tile_scale, geometry, out_dtype):
    return grad_y.new_empty((*grad_y.shape[:-1], geometry[1]), dtype=out_dtype)


def _grad_z_fake(a, b, z, tile_slot, tile_scale, scaler_inv, geometry):
    return z.new_empty(z.shape, dtype=torch.float32)


def _embedding_fake(ids, z, tile_slot, tile_scale, scaler_inv, geometry, dtype):
    return z.new_empty((*ids.shape, geometry[1]), dtype=dtype)


def _linear_packed_fake(x, codes, scales, bias, tile_slot, tile_scale, geometry, zformat):
    return x.new_empty((*x.shape[:-1], geometry[0]))


def _linear_packed_grad_input_fake(
    grad_y, codes, scales, tile_slot, tile_scale, geometry, zformat, out_dtype
):
    return grad_y.new_empty((*grad_y.shape[:-1], geometry[1]), dtype=out_dtype)


def _embedding_packed_fake(ids, codes, scales, tile_slot, tile_scale, geometry, zformat, dtype):
    return scales.new_empty((*ids.shape, geometry[1]), dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Autograd: the backward calls the backward ops, so it is traceable too.
# --------------------------------------------------------------------------------------------------
def _linear_setup_context(ctx, inputs, output):
    x, z, bias, tile_slot, tile_scale, scaler_inv, geometry = inputs
    ctx.save_for_backward(x, z, tile_slot, tile_scale, scaler_inv)
    ctx.geometry = geometry
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _linear_backward(ctx, grad_y):
    x, z, tile_slot, tile_scale, scaler_inv = ctx.saved_tensors
    ops = getattr(torch.ops, NAMESPACE)
    grad_y = grad_y.contiguous()
    grad_x = grad_z = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = ops.roast_linear_grad_input(grad_y, z, tile_slot, tile_scale, ctx.geometry, x.dtype)
    if ctx.needs_input_grad[1]:
        grad_z = ops.roast_linear_grad_z(grad_y, x, z, tile_slot, tile_scale, scaler_inv, ctx.geometry).to(
            z.dtype
        )
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).float().sum(0).to(ctx.bias_dtype)
    return grad_x, grad_z, grad_b, None, None, None, None


def _embedding_setup_context(ctx, inputs, output):
    ids, z, tile_slot, tile_scale, scaler_inv, geometry, dtype = inputs
    ctx.save_for_backward(ids, z, tile_slot, tile_scale, scaler_inv)
    ctx.geometry = geometry


def _embedding_backward(ctx, grad_out):
    ids, z, tile_slot, tile_scale, scaler_inv = ctx.saved_tensors
    grad_z = None
    if ctx.needs_input_grad[1]:
        ops = getattr(torch.ops, NAMESPACE)
        grad_z = ops.roast_embedding_grad_z(
            ids, grad_out.contiguous(), z, tile_slot, tile_scale, scaler_inv, ctx.geometry
        ).to(z.dtype)
    return None, grad_z, None, None, None, None, None


def _linear_packed_setup_context(ctx, inputs, output):
    x, codes, scales, bias, tile_slot, tile_scale, geometry, zformat = inputs
    ctx.save_for_backward(codes, scales, tile_slot, tile_scale)
    ctx.geometry, ctx.zformat, ctx.x_dtype = geometry, zformat, x.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _linear_packed_backward(ctx, grad_y):
    """dX and the bias's gradient; a packed z has none (it is no parameter: train with z_qat instead)."""
    codes, scales, tile_slot, tile_scale = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = getattr(torch.ops, NAMESPACE).roast_linear_packed_grad_input(
            grad_y, codes, scales, tile_slot, tile_scale, ctx.geometry, ctx.zformat, ctx.x_dtype
        )
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).float().sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_b, None, None, None, None


def _register() -> None:
    """Define the ops once per process; a no-op when they exist already."""
    if ops_registered():
        return
    impls = {
        "roast_linear": (_linear_impl, _linear_fake),
        "roast_linear_grad_input": (_linear_grad_input_impl, _linear_grad_input_fake),
        "roast_linear_grad_z": (_linear_grad_z_impl, _grad_z_fake),
        "roast_embedding": (_embedding_impl, _embedding_fake),
        "roast_embedding_grad_z": (_embedding_grad_z_impl, _grad_z_fake),
        "roast_linear_packed": (_linear_packed_impl, _linear_packed_fake),
        "roast_linear_packed_grad_input": (_linear_packed_grad_input_impl, _linear_packed_grad_input_fake),
        "roast_embedding_packed": (_embedding_packed_impl, _embedding_packed_fake),
    }
    ops = {}
    for name, (impl, fake) in impls.items():
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=_SCHEMAS[name])
        op.register_fake(fake)
        ops[name] = op
    ops["roast_linear"].register_autograd(_linear_backward, setup_context=_linear_setup_context)
    ops["roast_embedding"].register_autograd(_embedding_backward, setup_context=_embedding_setup_context)
    ops["roast_linear_packed"].register_autograd(
        _linear_packed_backward, setup_context=_linear_packed_setup_context
    )


_register()


# --------------------------------------------------------------------------------------------------
# Entry points used by hf_roast.backends.dispatch.
# --------------------------------------------------------------------------------------------------
def _check_runnable(name: str, device: torch.device, *dtypes: torch.dtype) -> None:
    if device.type == "meta":
        return  # shape inference only: the fake implementations handle it
    reason = triton_unavailable_reason(device, dtypes)
    if reason is not None:
        raise RuntimeError(f"{name}: the Triton kernels cannot run: {reason}. Use backend='torch'.")


def triton_roast_linear(
    x: torch.Tensor, z: torch.Tensor | QuantizedZ, bias: torch.Tensor | None, layer_map: LayerMapping
) -> torch.Tensor:
    """y = x @ W^T (+ b) with W read from z inside the kernels, for ``x`` of any leading shape."""
    packed = isinstance(z, QuantizedZ)
    _check_runnable(layer_map.spec.name, x.device, x.dtype, torch.float32 if packed else z.dtype)
    if x.shape[-1] != layer_map.spec.cols:
        raise ValueError(
            f"{layer_map.spec.name}: input has {x.shape[-1]} features but the layer expects {layer_map.spec.cols}."
        )
    if packed:
        return getattr(torch.ops, NAMESPACE).roast_linear_packed(
            x,
            z.codes,
            z.scales,
            bias,
            layer_map.tile_slot,
            layer_map.tile_scale,
            geometry_of(layer_map),
            [z.bits, z.group_size],
        )
    return getattr(torch.ops, NAMESPACE).roast_linear(
        x, z, bias, layer_map.tile_slot, layer_map.tile_scale, layer_map.scaler_inv, geometry_of(layer_map)
    )


def triton_roast_embedding(
    ids: torch.Tensor, z: torch.Tensor | QuantizedZ, layer_map: LayerMapping, dtype: torch.dtype
) -> torch.Tensor:
    """Rows of the embedding for ``ids`` (any shape), gathered from z; backward scatters into z."""
    if isinstance(z, QuantizedZ):
        _check_runnable(layer_map.spec.name, z.device, dtype, torch.float32)
        return getattr(torch.ops, NAMESPACE).roast_embedding_packed(
            ids,
            z.codes,
            z.scales,
            layer_map.tile_slot,
            layer_map.tile_scale,
            geometry_of(layer_map),
            [z.bits, z.group_size],
            dtype,
        )
    _check_runnable(layer_map.spec.name, z.device, dtype, z.dtype)
    return getattr(torch.ops, NAMESPACE).roast_embedding(
        ids, z, layer_map.tile_slot, layer_map.tile_scale, layer_map.scaler_inv, geometry_of(layer_map), dtype
    )
