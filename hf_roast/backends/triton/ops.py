"""The Triton kernels as the CUDA implementation of the ``hf_roast::`` ops.

The ops themselves (schemas, fake implementations, autograd) are defined apart, in
:mod:`hf_roast.backends.custom_ops`; this module registers the kernels for CUDA tensors on first import,
once per process (a second import, e.g. of the same file under another module name, registers nothing), so
torch picks them by device and ``torch.compile`` traces each call as one node.

Under the Triton interpreter (``TRITON_INTERPRET=1``, tests without a GPU) the kernels run on CPU tensors;
there, :mod:`hf_roast.backends.cpu_kernels` hands the ops' CPU key to :data:`IMPLS` instead of the C++
kernel, so the interpreter tests exercise these kernels through the real ops (see that module for why).
"""

import torch

# absolute: the package may be imported under another name (tests), and the ops must stay one set
from hf_roast.backends.custom_ops import (
    SCHEMAS,
    call_embedding,
    call_linear,
    ops_registered,
    register_kernels,
)
from hf_roast.backends.geometry import Geometry, geometry_of
from hf_roast.backends.triton.available import triton_unavailable_reason
from hf_roast.mapping import LayerMapping
from hf_roast.quant import QuantizedZ

from . import roast_matmul as rm

__all__ = ["IMPLS", "geometry_of", "ops_registered", "triton_roast_embedding", "triton_roast_linear"]


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


IMPLS = {
    "roast_linear": _linear_impl,
    "roast_linear_grad_input": _linear_grad_input_impl,
    "roast_linear_grad_z": _linear_grad_z_impl,
    "roast_embedding": _embedding_impl,
    "roast_embedding_grad_z": _embedding_grad_z_impl,
    "roast_linear_packed": _linear_packed_impl,
    "roast_linear_packed_grad_input": _linear_packed_grad_input_impl,
    "roast_embedding_packed": _embedding_packed_impl,
}
"""The kernels by op name, in the ops' argument order."""
assert IMPLS.keys() == SCHEMAS.keys()

register_kernels("cuda", IMPLS)


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
    return call_linear(x, z, bias, layer_map)


def triton_roast_embedding(
    ids: torch.Tensor, z: torch.Tensor | QuantizedZ, layer_map: LayerMapping, dtype: torch.dtype
) -> torch.Tensor:
    """Rows of the embedding for ``ids`` (any shape), gathered from z; backward scatters into z."""
    _check_runnable(
        layer_map.spec.name, z.device, dtype, torch.float32 if isinstance(z, QuantizedZ) else z.dtype
    )
    return call_embedding(ids, z, layer_map, dtype)
