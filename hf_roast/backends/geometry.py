"""One module's mapping as plain ints: what the ``hf_roast::`` ops take in place of a :class:`LayerMapping`.

Custom ops take tensors and scalars, not Python objects, so every kernel behind them (the Triton kernels on
CUDA, the C++ kernel on CPU) locates a module's weights from :class:`Geometry` as an ``int[]``. It lives
here, beside the op definitions (:mod:`hf_roast.backends.custom_ops`) and apart from every execution path,
because each path reads it and importing it must not import triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_roast.mapping import (
    LayerMapping,
    MappingPlan,
    ModuleSpec,
    is_tiled_mapper,
    scaler_unit,
    seed_constants,
    tiles_along,
)
from hf_roast.vocab import MAPPER_IDS, MAPPERS, SIGN_IDS


@torch.compiler.assume_constant_result
def _hash_constants(seed: int) -> tuple[int, int, int, int]:
    """Seeded slot and sign constants. SHA-256 is opaque to torch.compile: it folds the result instead."""
    return (*seed_constants(seed, "slot"), *seed_constants(seed, "sign"))


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
    def element_sign(self) -> bool:
        return self.sign == SIGN_IDS["element"]

    @property
    def hashed(self) -> bool:
        """Whether the kernels hash every weight (element signs, hashednet): the launch table's "-hashed" class."""
        return not self.tiled or self.element_sign

    @property
    def n_tile_rows(self) -> int:
        return tiles_along(self.rows, self.tile_rows)

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


_GEOMETRY_CACHE: dict[tuple, list[int]] = {}


def spec_geometry(plan: MappingPlan, spec: ModuleSpec) -> list[int]:
    """Module ``spec``'s Geometry under ``plan`` as ints, cached: the seeded constants cost a SHA-256 each."""
    key = (plan.mapper, plan.sign, plan.seed, plan.tile, spec.rows, spec.cols, spec.tile_offset,
           spec.segment_start, spec.segment_size)  # fmt: skip
    geometry = _GEOMETRY_CACHE.get(key)
    if geometry is None:
        geometry = _GEOMETRY_CACHE[key] = Geometry.of(plan, spec).as_list()
    return geometry


def geometry_of(layer_map: LayerMapping) -> list[int]:
    """The layer's Geometry as ints: the ones its owner handed over for this very spec
    (``LayerMapping.geometry``), else :func:`spec_geometry`."""
    handed = layer_map.geometry
    if handed is not None and handed[0] is layer_map.spec:
        return handed[1]
    return spec_geometry(layer_map.plan, layer_map.spec)
