"""The mapping formulas of :mod:`hf_roast.mapping` and the dequantisation formulas of :mod:`hf_roast.quant`,
recompiled with ``triton.jit``.

The kernels must compute exactly the same slots and signs as the PyTorch path, bit for bit, so they
never get a formula of their own: each Python function from :func:`hf_roast.mapping.formula_functions`
is rebound to a namespace where the module constants are ``tl.constexpr`` and its sibling formulas
are their jitted versions, then wrapped with ``triton.jit``. Callers must pass int64 values (Triton
types Python ints below 2**31 as int32, which would overflow inside ``hash31``).
"""

from __future__ import annotations

import types

import triton
import triton.language as tl

from hf_roast import quant
from hf_roast.mapping import formula_constants, formula_functions


def _compile_formulas(functions=formula_functions, constants=formula_constants) -> dict[str, object]:
    namespace: dict[str, object] = {"tl": tl}
    namespace.update({name: tl.constexpr(value) for name, value in constants().items()})
    for fn in functions():  # dependency order: later formulas call the earlier jitted ones
        rebound = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
        rebound.__doc__ = fn.__doc__
        rebound.__module__ = __name__
        rebound.__qualname__ = fn.__qualname__
        namespace[fn.__name__] = triton.jit(rebound)
    return namespace


_JIT = _compile_formulas()
tile_coordinates = _JIT["tile_coordinates"]
virtual_index = _JIT["virtual_index"]
hash31 = _JIT["hash31"]
stable_slot = _JIT["stable_slot"]
roast_slot = _JIT["roast_slot"]
hashednet_slot = _JIT["hashednet_slot"]
hash_sign = _JIT["hash_sign"]

_QUANT_JIT = _compile_formulas(quant.formula_functions, quant.formula_constants)
storage_index = _QUANT_JIT["storage_index"]
group_of = _QUANT_JIT["group_of"]
code_of = _QUANT_JIT["code_of"]
dequantize_value = _QUANT_JIT["dequantize_value"]
