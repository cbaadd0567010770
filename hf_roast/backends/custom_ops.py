"""The ``hf_roast::`` ops as ``torch.library`` custom ops: schemas, fake (meta) implementations and autograd,
but no kernel. Each device's kernel is registered by the path that implements it, as bitsandbytes does:

* CUDA: the Triton kernels (:mod:`hf_roast.backends.triton.ops`, on import);
* CPU: :mod:`hf_roast.backends.cpu_kernels`, which hands the forward linear ops to the C++ kernel.

So torch picks the implementation by device, ``torch.compile`` sees one op whatever the device (a single
node, no graph break), and meta tensors / FakeTensor infer shapes from the fake implementations.

Ops (namespace ``hf_roast``):

* ``roast_linear(x, z, bias, tile_slot, tile_scale, scaler_inv, geometry) -> y`` (differentiable in x,
  z and bias), with its two backward ops ``roast_linear_grad_input`` and ``roast_linear_grad_z``;
* ``roast_embedding(ids, z, tile_slot, tile_scale, scaler_inv, geometry, dtype) -> out`` (differentiable
  in z), with ``roast_embedding_grad_z``;
* ``roast_linear_packed`` / ``roast_linear_packed_grad_input`` / ``roast_embedding_packed``: the same reads
  from a packed z (``RoastConfig.z_bits`` 8 or 4: integer codes and group scales; ``zformat`` is
  ``[bits, group_size]``). A packed z is no parameter, so only x and the bias get gradients.

Three more ops have a CPU kernel only, the C++ one (:mod:`hf_roast.backends.cpu`, registered when its
library loads), and no autograd: the CPU backend's inference entry points, which its callers use for calls
that need no gradient:

* ``roast_linear_cpu(x, z, scales, bias, tile_slot, tile_scale, geometry, zformat) -> y``: the forward of
  ``roast_linear`` and ``roast_linear_packed`` in one (``zformat`` ``[0, 0]`` for a float z, else z is the
  codes and ``scales`` their group scales);
* ``roast_weight_cpu(z, scales, tile_slot, tile_scale, geometry, zformat, out)``: W in fp32 into ``out``;
* ``roast_dequantize_cpu(codes, scales, bits, group, start, n) -> values``.

They are separate ops, not the CPU kernels of ``roast_linear`` and friends, because under the Triton
interpreter (tests without a GPU) CPU tensors must reach the Triton kernels through those ops, which the C++
kernel cannot hand on; :mod:`hf_roast.backends.cpu_kernels` decides that per call, in Python, and a compiled
graph or a decode step calls the C++ op directly, with no Python in between.

``geometry`` is :class:`~hf_roast.backends.geometry.Geometry` as a list of ints. The ops are defined once
per process, on first import of this module, and never again (e.g. the same file imported under another
module name), so a second import can neither fail nor shadow the first.
"""

from __future__ import annotations

import torch

from hf_roast.mapping import LayerMapping
from hf_roast.quant import QuantizedZ

from .geometry import geometry_of

NAMESPACE = "hf_roast"

SCHEMAS = {
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

CPU_SCHEMAS = {
    "roast_linear_cpu": "(Tensor x, Tensor z, Tensor? scales, Tensor? bias, Tensor? tile_slot, Tensor tile_scale, "
    "int[] geometry, int[] zformat) -> Tensor",
    "roast_weight_cpu": "(Tensor z, Tensor? scales, Tensor? tile_slot, Tensor tile_scale, int[] geometry, "
    "int[] zformat, Tensor(a!) out) -> ()",
    "roast_dequantize_cpu": "(Tensor codes, Tensor scales, int bits, int group, int start, int n) -> Tensor",
}
"""The ops whose only kernel is the C++ one for CPU (registered by hf_roast/backends/cpu/roast_cpu_op.cpp)."""


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def ops_registered() -> bool:
    """True when every ``hf_roast::`` op exists in this process."""
    namespace = getattr(torch.ops, NAMESPACE)
    return all(hasattr(namespace, name) for name in (*SCHEMAS, *CPU_SCHEMAS))


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether op ``name`` has a kernel for ``dispatch_key`` ("CPU", "CUDA"): registration is once per process."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname(name), dispatch_key)


_LIBRARIES: list[torch.library.Library] = []
"""The libraries holding the registered kernels: a kernel lives as long as its library object."""


def register_kernels(device: str, kernels: dict) -> None:
    """Register one kernel per op (``kernels``: op name -> callable) for ``device`` ("cpu", "cuda"), once per
    process: a second call (the same backend imported again under another module name) registers nothing."""
    if all(has_kernel(name, device.upper()) for name in kernels):
        return
    library = torch.library.Library(NAMESPACE, "FRAGMENT")
    for name, kernel in kernels.items():
        torch.library.register_kernel(qualname(name), device, kernel, lib=library)
    _LIBRARIES.append(library)


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


def _linear_cpu_fake(x, z, scales, bias, tile_slot, tile_scale, geometry, zformat):
    return x.new_empty((*x.shape[:-1], geometry[0]))


def _weight_cpu_fake(z, scales, tile_slot, tile_scale, geometry, zformat, out):
    return None


def _dequantize_cpu_fake(codes, scales, bits, group, start, n):
    return scales.new_empty((n,))


FAKES = {
    "roast_linear": _linear_fake,
    "roast_linear_grad_input": _linear_grad_input_fake,
    "roast_linear_grad_z": _grad_z_fake,
    "roast_embedding": _embedding_fake,
    "roast_embedding_grad_z": _grad_z_fake,
    "roast_linear_packed": _linear_packed_fake,
    "roast_linear_packed_grad_input": _linear_packed_grad_input_fake,
    "roast_embedding_packed": _embedding_packed_fake,
    "roast_linear_cpu": _linear_cpu_fake,
    "roast_weight_cpu": _weight_cpu_fake,
    "roast_dequantize_cpu": _dequantize_cpu_fake,
}


# --------------------------------------------------------------------------------------------------
# Autograd: the backward calls the backward ops, so it is traceable too (and runs on whichever device
# has kernels for them).
# --------------------------------------------------------------------------------------------------
def _ops():
    return getattr(torch.ops, NAMESPACE)


def _linear_setup_context(ctx, inputs, output):
    x, z, bias, tile_slot, tile_scale, scaler_inv, geometry = inputs
    ctx.save_for_backward(x, z, tile_slot, tile_scale, scaler_inv)
    ctx.geometry = geometry
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _linear_backward(ctx, grad_y):
    x, z, tile_slot, tile_scale, scaler_inv = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    grad_x = grad_z = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops().roast_linear_grad_input(grad_y, z, tile_slot, tile_scale, ctx.geometry, x.dtype)
    if ctx.needs_input_grad[1]:
        grad_z = _ops().roast_linear_grad_z(grad_y, x, z, tile_slot, tile_scale, scaler_inv, ctx.geometry)
        grad_z = grad_z.to(z.dtype)
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
        grad_z = (
            _ops()
            .roast_embedding_grad_z(
                ids, grad_out.contiguous(), z, tile_slot, tile_scale, scaler_inv, ctx.geometry
            )
            .to(z.dtype)
        )
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
        grad_x = _ops().roast_linear_packed_grad_input(
            grad_y, codes, scales, tile_slot, tile_scale, ctx.geometry, ctx.zformat, ctx.x_dtype
        )
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).float().sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_b, None, None, None, None


_LIBRARY: torch.library.Library | None = None
"""The fragment that owns the definitions (kept alive: dropping it would unregister them)."""


def _define() -> None:
    """Define the ops, their fake implementations and autograd, once per process."""
    global _LIBRARY
    if ops_registered():
        return
    _LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
    for name, schema in (*SCHEMAS.items(), *CPU_SCHEMAS.items()):
        _LIBRARY.define(name + schema)
        torch.library.register_fake(qualname(name), FAKES[name], lib=_LIBRARY)
    for name, backward, setup in (
        ("roast_linear", _linear_backward, _linear_setup_context),
        ("roast_embedding", _embedding_backward, _embedding_setup_context),
        ("roast_linear_packed", _linear_packed_backward, _linear_packed_setup_context),
    ):
        torch.library.register_autograd(qualname(name), backward, setup_context=setup, lib=_LIBRARY)


_define()


# --------------------------------------------------------------------------------------------------
# Calls from a LayerMapping (the paths' entry points).
# --------------------------------------------------------------------------------------------------
def call_linear(
    x: torch.Tensor, z: torch.Tensor | QuantizedZ, bias: torch.Tensor | None, layer_map: LayerMapping
) -> torch.Tensor:
    """``hf_roast::roast_linear`` (or ``roast_linear_packed`` for a packed z) for one layer: the device's
    kernel runs, or, while compiling, one node of the graph."""
    if isinstance(z, QuantizedZ):
        return _ops().roast_linear_packed(
            x, z.codes, z.scales, bias, layer_map.tile_slot, layer_map.tile_scale, geometry_of(layer_map),
            [z.bits, z.group_size],
        )  # fmt: skip
    return _ops().roast_linear(
        x, z, bias, layer_map.tile_slot, layer_map.tile_scale, layer_map.scaler_inv, geometry_of(layer_map)
    )


def call_embedding(
    ids: torch.Tensor, z: torch.Tensor | QuantizedZ, layer_map: LayerMapping, dtype: torch.dtype
) -> torch.Tensor:
    """``hf_roast::roast_embedding`` (or ``roast_embedding_packed``) for one layer."""
    if isinstance(z, QuantizedZ):
        return _ops().roast_embedding_packed(
            ids, z.codes, z.scales, layer_map.tile_slot, layer_map.tile_scale, geometry_of(layer_map),
            [z.bits, z.group_size], dtype,
        )  # fmt: skip
    return _ops().roast_embedding(
        ids, z, layer_map.tile_slot, layer_map.tile_scale, layer_map.scaler_inv, geometry_of(layer_map), dtype
    )
