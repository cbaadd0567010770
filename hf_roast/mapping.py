"""The ROAST / STABLE-RPS mapping: where every compressed weight lives in the shared array ``z``.

This module is the single home of every mapping formula. The PyTorch path calls the formulas on
int64 tensors; the Triton kernels compile the *same* Python functions (see :func:`formula_functions`
and ``hf_roast.backends.triton.mapping_jit``), so the two paths cannot drift apart.

Layout (docs/spec.md, sections 2-3: the tile-compatible RandomFold of STABLE-RPS):

* every compressed module ``l`` is a ``rows x cols`` matrix (``out x in`` for a linear layer,
  ``num_embeddings x dim`` for an embedding), cut into ``TR x TC`` mapping tiles, edge tiles padded;
* tiles are numbered tile-major over the modules in a fixed order: global tile ``g = offset_l + t``
  with ``t = tile_row * n_tile_cols + tile_col``; element ``e = (r % TR) * TC + (c % TC)`` inside it;
  the model-wide virtual index is ``v = g * T + e`` with ``T = TR * TC``;
* ``z`` holds ``m = M * T`` floats (``M`` slot tiles). A tile mapper sends tile ``g`` to slot tile
  ``slot(g)``, i.e. to the contiguous, aligned span ``z[slot(g) * T : slot(g) * T + T]``.

Mappers:

* ``"stable"``: RandomFold, ``slot(g) = (shift(g // M) + g % M) % M``. A bijection when ``M`` covers
  every tile (1x recovers the dense model), perfectly balanced at integer compression.
* ``"roast"``: ICML-2023 ROAST, ``slot(g) = hash(g) % M``.
* ``"hashednet"``: per-element hash into a per-module segment of ``z`` (the papers' baseline).

Segments (``RoastConfig.compression_pattern``): a group of modules may read from its own segment of ``z``
instead of all of it. A tile mapper then numbers the group's tiles on their own (``g_s``: the tile's place
among the group's tiles, in module order) and sends tile ``g_s`` to ``start + slot(g_s)`` with ``M`` the
segment's slot tiles, so RandomFold stays a bijection at 1x and balanced within each segment. Without a
pattern there are no segments: ``start = 0``, ``M`` is all of ``z`` and ``g_s = g``, today's mapping exactly.

All hash arithmetic keeps every intermediate below 2**62, so int64 is exact on every platform and in
Triton, for virtual indices far beyond 2**31.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from .vocab import MAPPERS, MAPPING_VERSION, MODULE_KINDS, SCALERS, SIGNS, check_choice

P31 = 2147483647  # the Mersenne prime 2**31 - 1: products of two values below it stay below 2**62
MIX_A = 1103515245
MIX_B = 12345


# --------------------------------------------------------------------------------------------------
# Formulas. Plain arithmetic on non-negative int64 values only (+, *, %, //, >>, ^, &), so the same
# functions run on torch tensors and, recompiled by triton.jit, inside the kernels. Callers must pass
# int64 values for ``x`` / ``g`` / ``v`` (the seed constants may be Python ints below 2**31).
# --------------------------------------------------------------------------------------------------
def hash31(x, a, b):
    """Seeded hash of a non-negative int64 below 2**62 to [0, 2**31)."""
    h = (a * (x % P31) + b) % P31
    h = h ^ (h >> 13)
    h = (MIX_A * ((h + x // P31) % P31) + MIX_B) % P31
    return h ^ (h >> 16)


def stable_slot(g, n_slot_tiles, a, b):
    """RandomFold: fold ``g // M`` is cyclically shifted by a seeded amount."""
    return (hash31(g // n_slot_tiles, a, b) % n_slot_tiles + g % n_slot_tiles) % n_slot_tiles


def roast_slot(g, n_slot_tiles, a, b):
    """ROAST: each tile hashed on its own to an aligned slot tile."""
    return hash31(g, a, b) % n_slot_tiles


def hashednet_slot(v, segment_start, segment_size, a, b):
    """HashedNet: each element hashed on its own into its module's segment of z."""
    return segment_start + hash31(v, a, b) % segment_size


def tiles_along(length: int, tile: int) -> int:
    """How many tiles of size ``tile`` cover ``length`` weights (the last one may be partial). Written with
    non-negative operands only, so that the CPU kernel's C translation (where ``/`` truncates) agrees."""
    return (length + tile - 1) // tile


def is_tiled_mapper(mapper: str) -> bool:
    """Tile mappers (stable, roast) read each mapping tile from one aligned span of z; hashednet does not."""
    return mapper != "hashednet"


def scaler_unit(mapper: str, tile: Sequence[int]) -> int:
    """z elements per gradient-scaler entry: a slot tile for tile mappers, one element for hashednet."""
    return tile[0] * tile[1] if is_tiled_mapper(mapper) else 1


def tile_coordinates(r, c, n_tile_cols, tile_rows, tile_cols):
    """Module-local tile of weight (r, c) (tile-major, row-major over tiles) and its offset in the tile."""
    return (r // tile_rows) * n_tile_cols + c // tile_cols, (r % tile_rows) * tile_cols + c % tile_cols


def virtual_index(local_tile, element, tile_offset, tile_numel):
    """Model-wide virtual index v = g * T + e of an element, with g = tile_offset + local_tile."""
    return (local_tile + tile_offset) * tile_numel + element


def hash_sign(x, a, b):
    """A seeded sign in {-1, +1} (as int64) for a tile or element index."""
    return 1 - 2 * (hash31(x, a, b) & 1)


def formula_functions():
    """The formulas above, in dependency order, for recompilation by the Triton kernels."""
    return [tile_coordinates, virtual_index, hash31, stable_slot, roast_slot, hashednet_slot, hash_sign]


def formula_constants() -> dict[str, int]:
    return {"P31": P31, "MIX_A": MIX_A, "MIX_B": MIX_B}


@functools.lru_cache(maxsize=256)
def seed_constants(seed: int, purpose: str) -> tuple[int, int]:
    """Two hash constants in [1, P31) derived from the seed, stable across Python and torch versions."""
    digest = hashlib.sha256(f"hf-roast/v{MAPPING_VERSION}/{int(seed)}/{purpose}".encode()).digest()
    a = int.from_bytes(digest[:8], "little") % (P31 - 1) + 1
    b = int.from_bytes(digest[8:16], "little") % (P31 - 1) + 1
    return a, b


# --------------------------------------------------------------------------------------------------
# The plan: module list, offsets, sizes.
# --------------------------------------------------------------------------------------------------
@dataclass
class ModuleSpec:
    """One compressed module's place in the model-wide virtual index."""

    name: str
    kind: str  # one of MODULE_KINDS: what the module was, and so how its dense weight is laid out
    rows: int
    cols: int
    scale: float  # lambda_l
    tile_offset: int = 0  # first global tile index
    segment_start: int = 0  # hashednet only: first element of the module's own array in z
    segment_size: int = 0  # hashednet only: its length
    # tile mappers only: the module's segment of z in slot tiles (compression_pattern). segment_tiles == 0 is
    # "no segment": the module reads all of z (the default; these two keys are then not stored)
    segment_start_tile: int = 0
    segment_tiles: int = 0

    def n_tile_rows(self, tile: Sequence[int]) -> int:
        return tiles_along(self.rows, tile[0])

    def n_tile_cols(self, tile: Sequence[int]) -> int:
        return tiles_along(self.cols, tile[1])

    def n_tiles(self, tile: Sequence[int]) -> int:
        return self.n_tile_rows(tile) * self.n_tile_cols(tile)

    @property
    def numel(self) -> int:
        return self.rows * self.cols


def _segment_groups(
    modules: list[ModuleSpec], segments: Mapping[str, tuple[float, Collection[str]]] | None
) -> list[tuple[str | None, float | None, list[ModuleSpec]]]:
    """``(key, compression, specs)`` of every segment in z's order: the pooled modules first (key None; all
    of them without ``segments``), then one per key, each list in module order. Every key must claim at least
    one module of the plan and no module may be claimed twice."""
    by_name = {spec.name: spec for spec in modules}
    owner: dict[str, str] = {}
    groups: list[tuple[str | None, float | None, list[ModuleSpec]]] = []
    for key, (ratio, names) in (segments or {}).items():
        unknown = sorted(set(names) - set(by_name))
        if unknown:
            raise ValueError(f"segment {key!r} claims modules the plan does not compress: {unknown[:4]}.")
        if not names:
            raise ValueError(f"segment {key!r} claims no module.")
        for name in names:
            if name in owner:
                raise ValueError(f"module {name!r} is claimed by both segment {owner[name]!r} and {key!r}.")
            owner[name] = key
        claimed = set(names)
        groups.append((key, float(ratio), [spec for spec in modules if spec.name in claimed]))
    pooled = [spec for spec in modules if spec.name not in owner]
    return [(None, None, pooled), *groups]


def plan_digest(plan_dict: dict) -> str:
    """SHA-256 of a stored plan's canonical JSON. Checkpoints store it beside the plan, so that an edited
    scale or offset (which would load as a silently different model) is refused instead."""
    canonical = json.dumps(plan_dict, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class MappingPlan:
    """Everything needed to find any compressed weight in z; serialised into the checkpoint."""

    mapper: str
    sign: str
    seed: int
    tile: tuple[int, int]
    num_slots: int  # m, the length of z
    modules: list[ModuleSpec] = field(default_factory=list)
    mapping_version: int = MAPPING_VERSION

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        modules: list[ModuleSpec],
        *,
        mapper: str,
        sign: str,
        seed: int,
        tile: Sequence[int],
        compression: float | None = None,
        num_parameters: int | None = None,
        segments: Mapping[str, tuple[float, Collection[str]]] | None = None,
    ) -> MappingPlan:
        """Lay the modules out tile-major and size z from a compression ratio or an explicit budget.

        ``segments`` (from ``RoastConfig.compression_pattern``): key -> (its compression, the names of the
        modules it claims), in pattern order. Each key's modules read from their own segment of z, sized from
        their tile-padded weights at the key's compression (whole slot tiles); the other (pooled) modules
        share the first segment, sized at ``compression`` or with what ``num_parameters`` leaves. None or
        empty: one segment, all of z, exactly the mapping without a pattern.
        """
        check_choice("mapper", mapper, MAPPERS)
        check_choice("sign", sign, SIGNS)
        tile = (int(tile[0]), int(tile[1]))
        if not modules:
            raise ValueError("No module to compress: check target_modules / exclude_modules.")
        t = tile[0] * tile[1]
        offset = 0
        for spec in modules:
            spec.tile_offset = offset
            spec.segment_start = spec.segment_size = spec.segment_start_tile = spec.segment_tiles = 0
            offset += spec.n_tiles(tile)
        n_real = sum(s.numel for s in modules)
        n_padded = offset * t
        if n_padded > 2 * n_real:
            raise ValueError(
                f"The {tile[0]}x{tile[1]} mapping tile does not fit these modules: padding them to whole tiles gives "
                f"{n_padded} virtual weights for {n_real} real ones (over half padding). Use a smaller tile."
            )
        if num_parameters is not None and num_parameters > n_padded:
            raise ValueError(
                f"num_parameters={num_parameters} exceeds the {n_padded} (tile-padded) weights of the "
                "target modules: lower it, or use compression=1.0 for an exact copy."
            )
        groups = _segment_groups(modules, segments)
        keyed_tiles = []  # slot tiles of each keyed segment, in pattern order
        for key, ratio, specs in groups[1:]:
            n_pad_k = sum(s.n_tiles(tile) for s in specs) * t
            wanted = math.ceil(n_pad_k / float(ratio))
            if wanted < t:
                raise ValueError(
                    f"compression_pattern[{key!r}]={ratio:g} gives the {sum(s.numel for s in specs)} weights of the "
                    f"modules it matches a segment of {wanted} values, less than one {tile[0]}x{tile[1]} mapping "
                    f"tile ({t}): use at most compression {n_pad_k / t:g} for that key, or a smaller tile."
                )
            keyed_tiles.append(-(-wanted // t))
        pooled = groups[0][2]
        if num_parameters is not None:
            wanted = int(num_parameters) - sum(keyed_tiles) * t
            if segments and not pooled:
                raise ValueError(
                    "num_parameters sizes the segment of the modules no compression_pattern key matches, but every "
                    "module matches a key: drop num_parameters (z is then the sum of the keys' segments)."
                )
        else:
            wanted = math.ceil(sum(s.n_tiles(tile) for s in pooled) * t / float(compression)) if pooled else 0
        if pooled and wanted < t:
            if segments:
                raise ValueError(
                    f"The modules no compression_pattern key matches ({sum(s.numel for s in pooled)} weights) get "
                    f"{max(wanted, 0)} values of z, less than one {tile[0]}x{tile[1]} mapping tile ({t}): lower "
                    "`compression` (or raise num_parameters), or use a smaller tile."
                )
            raise ValueError(
                f"The budget gives z fewer weights ({wanted}) than one {tile[0]}x{tile[1]} mapping tile ({t}), so the "
                "tile does not fit: "
                f"the {n_real} target weights allow at most compression={n_padded / t:g} with this tile. "
                "Lower the compression or use a smaller tile."
            )
        pooled_tiles = -(-wanted // t) if pooled else 0  # z is a whole number of aligned slot tiles
        num_slots = (pooled_tiles + sum(keyed_tiles)) * t
        plan = cls(mapper=mapper, sign=sign, seed=int(seed), tile=tile, num_slots=num_slots, modules=modules)
        # segments in slot tiles: the pooled one first (all of z without a pattern), then one per key
        layout, start = [], 0
        for (_, _, specs), n_tiles in zip(groups, [pooled_tiles, *keyed_tiles]):
            if specs:
                layout.append((specs, start, n_tiles))
                start += n_tiles
        if mapper == "hashednet":
            plan._assign_segments([(specs, start * t, n * t) for specs, start, n in layout])
        elif segments:
            for specs, start, n in layout:
                for spec in specs:
                    spec.segment_start_tile, spec.segment_tiles = start, n
        return plan

    def _assign_segments(self, groups: list[tuple[list[ModuleSpec], int, int]]) -> None:
        """HashedNet's per-module arrays: each group's span ``(specs, start, size)`` of z (all of z without a
        compression_pattern) split in proportion to its modules' sizes (each >= 1)."""
        for specs, start, size in groups:
            n_real = sum(spec.numel for spec in specs)
            sizes = [max(1, (spec.numel * size) // n_real) for spec in specs]
            sizes[-1] += size - sum(sizes)
            if sizes[-1] < 1:
                raise ValueError(
                    "Too many modules for this budget under the hashednet mapper: lower the compression."
                )
            for spec, n in zip(specs, sizes):
                spec.segment_start, spec.segment_size = start, n
                start += n

    # ---- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["tile"] = list(self.tile)
        for m in d["modules"]:  # no segment: stored as before segments existed (same keys, same digest)
            if not m["segment_tiles"] and not m["segment_start_tile"]:
                del m["segment_start_tile"], m["segment_tiles"]
        return d

    def check(self) -> None:
        """Refuse a plan whose layout is inconsistent (ValueError naming the part), before any index is built."""
        t = self.tile_numel
        if self.num_slots < t or self.num_slots % t:
            raise ValueError(
                f"plan.num_slots={self.num_slots} is not a positive multiple of the tile size {t}."
            )
        offset = 0
        for spec in self.modules:
            if spec.kind not in MODULE_KINDS or spec.rows < 1 or spec.cols < 1:
                raise ValueError(
                    f"plan module {spec.name!r}: bad kind or shape ({spec.kind}, {spec.rows}x{spec.cols})."
                )
            if not math.isfinite(spec.scale) or spec.scale <= 0:
                raise ValueError(f"plan module {spec.name!r}: scale {spec.scale!r} is not a positive number.")
            if spec.tile_offset != offset:
                raise ValueError(f"plan module {spec.name!r}: tile_offset {spec.tile_offset} != {offset}.")
            offset += spec.n_tiles(self.tile)
            if self.mapper == "hashednet" and not (
                0 <= spec.segment_start and spec.segment_size >= 1
                and spec.segment_start + spec.segment_size <= self.num_slots
            ):  # fmt: skip
                raise ValueError(f"plan module {spec.name!r}: its hashednet segment lies outside z.")
        if not self.modules:
            raise ValueError("plan has no module.")
        self._check_tile_segments()

    def _check_tile_segments(self) -> None:
        """Tile mappers' segments: none at all (every module reads all of z), or segments that tile z exactly
        (each inside z, two modules' segments equal or disjoint, every slot tile in one)."""
        segments = {(s.segment_start_tile, s.segment_tiles) for s in self.modules}
        if segments == {(0, 0)}:
            return
        if not self.is_tiled:
            raise ValueError(
                "plan: the hashednet mapper has no tile segments (segment_start_tile, segment_tiles)."
            )
        covered = 0
        for start, n in sorted(segments):
            if n < 1 or start != covered:
                bad = next(
                    s.name for s in self.modules if (s.segment_start_tile, s.segment_tiles) == (start, n)
                )
                raise ValueError(
                    f"plan module {bad!r}: its segment (slot tiles {start}..{start + n - 1}) leaves a gap, overlaps "
                    "another one or is empty."
                )
            covered += n
        if covered != self.num_slot_tiles:
            raise ValueError(f"plan: the segments cover {covered} slot tiles, z has {self.num_slot_tiles}.")

    def digest(self) -> str:
        """SHA-256 of the plan as stored (see :func:`plan_digest`)."""
        return plan_digest(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> MappingPlan:
        d = dict(d)
        modules = [ModuleSpec(**m) for m in d.pop("modules")]
        d["tile"] = tuple(d["tile"])
        return cls(modules=modules, **d)

    # ---- queries -----------------------------------------------------------------------------------
    @property
    def tile_numel(self) -> int:
        return self.tile[0] * self.tile[1]

    @property
    def num_slot_tiles(self) -> int:
        return self.num_slots // self.tile_numel

    @property
    def num_virtual(self) -> int:
        """Size of the tile-padded model-wide virtual index."""
        return sum(s.n_tiles(self.tile) for s in self.modules) * self.tile_numel

    @property
    def num_compressed(self) -> int:
        return sum(s.numel for s in self.modules)

    @property
    def is_tiled(self) -> bool:
        """Tile mappers read each mapping tile from one aligned span of z."""
        return is_tiled_mapper(self.mapper)

    @property
    def tiles_read_by_table(self) -> bool:
        """Whether a tile's values and signs come from its tile tables alone (a tile mapper, sign 'tile' or
        'none'): then any subset of tiles can be read through the subset's tables (:meth:`LayerMapping.select_tiles`).
        Element signs and hashednet hash each weight's position instead."""
        return self.is_tiled and self.sign != "element"

    def spec(self, name: str) -> ModuleSpec:
        for s in self.modules:
            if s.name == name:
                return s
        raise KeyError(name)

    def _global_tiles(self, spec: ModuleSpec, device=None) -> torch.Tensor:
        return torch.arange(spec.n_tiles(self.tile), dtype=torch.int64, device=device) + spec.tile_offset

    def slot_segment(self, spec: ModuleSpec) -> tuple[int, int, int]:
        """``(first slot tile, slot tiles, tile index base)`` of the module's segment of z (tile mappers).

        The base numbers the module's first tile among its segment's tiles (module order), so that each
        segment is a RandomFold of its own. Without a segment: ``(0, M, tile_offset)``, all of z and the
        model-wide tile index.
        """
        if not spec.segment_tiles:
            return 0, self.num_slot_tiles, spec.tile_offset
        segment = (spec.segment_start_tile, spec.segment_tiles)
        base = 0
        for s in self.modules:
            if s.name == spec.name:
                return spec.segment_start_tile, spec.segment_tiles, base
            if (s.segment_start_tile, s.segment_tiles) == segment:
                base += s.n_tiles(self.tile)
        raise KeyError(spec.name)

    def tile_slots(self, spec: ModuleSpec, device=None) -> torch.Tensor:
        """Slot tile of each of the module's tiles (tile mappers), int64 of n_tiles: W/T entries, not W."""
        if not self.is_tiled:
            raise ValueError("The hashednet mapper has no tile slots: it hashes every element.")
        start, n_slot_tiles, base = self.slot_segment(spec)
        g = torch.arange(spec.n_tiles(self.tile), dtype=torch.int64, device=device) + base
        a, b = seed_constants(self.seed, "slot")
        slot = stable_slot if self.mapper == "stable" else roast_slot
        return slot(g, n_slot_tiles, a, b) + start

    def tile_scales(self, spec: ModuleSpec, device=None) -> torch.Tensor:
        """lambda_l times the tile sign (sign="tile"), fp32 of n_tiles."""
        scale = torch.full((spec.n_tiles(self.tile),), float(spec.scale), dtype=torch.float32, device=device)
        if self.sign == "tile":
            a, b = seed_constants(self.seed, "sign")
            scale *= hash_sign(self._global_tiles(spec, device), a, b).to(torch.float32)
        return scale

    def tile_coordinates(self, spec: ModuleSpec, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(module-local tile index, offset inside the tile) of every column of the given rows, int64."""
        rows = rows.to(torch.int64)[..., None]
        cols = torch.arange(spec.cols, dtype=torch.int64, device=rows.device)
        return tile_coordinates(rows, cols, spec.n_tile_cols(self.tile), *self.tile)

    def element_index(self, spec: ModuleSpec, rows: torch.Tensor, tile_slots: torch.Tensor | None = None):
        """z index and element sign (or None) of every column of the given rows: both ``(*rows.shape, cols)``.

        ``tile_slots`` may pass a cached :meth:`tile_slots` table. Used by embeddings (the rows looked up)
        and by the hashednet mapper; the tile mappers' linear layers use the cheaper tile tables.
        """
        t = self.tile_numel
        local, e = self.tile_coordinates(spec, rows)
        v = virtual_index(local, e, spec.tile_offset, t)
        if self.is_tiled:
            slots = self.tile_slots(spec, rows.device) if tile_slots is None else tile_slots
            index = slots[local] * t + e
        else:
            a, b = seed_constants(self.seed, "slot")
            index = hashednet_slot(v, spec.segment_start, spec.segment_size, a, b)
        sign = None
        if self.sign == "element":
            a, b = seed_constants(self.seed, "sign")
            sign = hash_sign(v, a, b)
        return index, sign

    def tile_element_signs(self, spec: ModuleSpec, device=None) -> torch.Tensor:
        """Element signs laid out as ``(n_tiles, T)``, for sign="element" on the tile path (fp32)."""
        a, b = seed_constants(self.seed, "sign")
        local = torch.arange(spec.n_tiles(self.tile), dtype=torch.int64, device=device)[:, None]
        element = torch.arange(self.tile_numel, dtype=torch.int64, device=device)
        return hash_sign(virtual_index(local, element, spec.tile_offset, self.tile_numel), a, b).to(
            torch.float32
        )

    # ---- statistics for the gradient scaler and the pretrained init --------------------------------
    def scaler_unit(self) -> int:
        """Granularity of the scaler's counts: a slot tile for tile mappers, an element for hashednet."""
        return scaler_unit(self.mapper, self.tile)

    def slot_counts(self, spec: ModuleSpec, device=None) -> torch.Tensor:
        """c_lj: how many of module l's weights land in each scaler unit j (tiles for tile mappers)."""
        n_units = self.num_slots // self.scaler_unit()
        if self.is_tiled:
            slots = self.tile_slots(spec, device)
            return torch.bincount(slots, minlength=n_units).to(torch.float64)
        counts = torch.zeros(n_units, dtype=torch.float64, device=device)
        for rows in _row_chunks(spec, device):
            index, _ = self.element_index(spec, rows)
            counts += torch.bincount(index.flatten(), minlength=n_units).to(torch.float64)
        return counts


def _row_chunks(spec: ModuleSpec, device=None, max_elements: int = 1 << 22):
    """Row blocks of a module small enough that a per-element index over them stays bounded."""
    step = max(1, max_elements // max(1, spec.cols))
    for start in range(0, spec.rows, step):
        yield torch.arange(start, min(spec.rows, start + step), dtype=torch.int64, device=device)


def gradient_scaler(plan: MappingPlan, mode: str, device=None) -> torch.Tensor | None:
    """1 / s_j per scaler unit (docs/spec.md, section 6), or None for mode="none".

    v5: s_j = sum_l c_lj lambda_l^2;  v1: s_j = (sum_l c_lj lambda_l)^2 / sum_l c_lj. Unused units get 1.
    """
    check_choice("scaler", mode, SCALERS)
    if mode == "none":
        return None
    n_units = plan.num_slots // plan.scaler_unit()
    s_c = torch.zeros(n_units, dtype=torch.float64, device=device)
    s_cl = torch.zeros_like(s_c)
    s_cl2 = torch.zeros_like(s_c)
    for spec in plan.modules:
        c = plan.slot_counts(spec, device)
        s_c += c
        s_cl += c * abs(spec.scale)
        s_cl2 += c * spec.scale**2
    if mode == "v5":
        s = s_cl2
    else:  # v1
        s = torch.where(s_c > 0, s_cl**2 / s_c.clamp_min(1), torch.zeros_like(s_c))
    return torch.where(s > 0, 1.0 / s.clamp_min(1e-300), torch.ones_like(s)).to(torch.float32)


# --------------------------------------------------------------------------------------------------
# Per-layer tables: what every execution path (PyTorch, Triton) needs to read one layer's weights.
# --------------------------------------------------------------------------------------------------
@dataclass
class LayerMapping:
    """What one layer's execution paths need: the plan, its spec, and its small cached tables."""

    plan: MappingPlan
    spec: ModuleSpec
    tile_slot: torch.Tensor | None  # int64 [n_tiles] (tile mappers)
    tile_scale: torch.Tensor  # fp32 [n_tiles]: lambda * tile sign
    scaler_inv: torch.Tensor | None  # fp32 [m / unit]: 1 / s_j, the STABLE-RPS gradient scaler
    fake_quant: tuple[int, int] | None = (
        None  # (bits, group_size): z is an fp32 master read through its grid (QAT)
    )
    geometry: tuple[ModuleSpec, list[int]] | None = field(default=None, compare=False, repr=False)
    """The backends' integer view of (plan, spec) (``hf_roast.backends.geometry``) as the layer that owns this
    mapping computed it once, with the spec it was computed for (a copy made with another spec, e.g. by
    ``dataclasses.replace``, does not use it); None: the backends compute it from plan and spec. Under
    ``torch.compile`` every attribute a traced call reads is checked before each call, so a layer hands its
    ints over whole."""

    @classmethod
    def build(cls, plan: MappingPlan, spec: ModuleSpec, device=None) -> LayerMapping:
        """Fresh tables for ``spec`` on ``device``, without a gradient scaler (initialisation, calibration)."""
        slots = plan.tile_slots(spec, device) if plan.is_tiled else None
        return cls(plan, spec, slots, plan.tile_scales(spec, device), None)

    def select_tiles(self, axis: str, tiles: torch.Tensor | slice, length: int) -> LayerMapping:
        """The mapping of the sub-matrix of W made of some whole tile rows (``axis="rows"``) or tile columns
        (``"cols"``), in increasing order: SliceOut's compacted tables (:mod:`hf_roast.sliceout`).

        Every tile is read from its own span of z through ``tile_slot``, so keeping any set of tile rows costs
        the same as a contiguous block: the sub-mapping is the same slots and scales, gathered, and a spec of
        the kept size. Every execution path reads a tile through these tables alone, so it computes exactly
        the kept part of W, and the adjoint scatters into the kept tiles' slots only.

        ``tiles``: the kept tile indices along ``axis`` (an increasing int64 tensor on the tables' device, or
        a slice); ``length``: the rows (columns) they hold, the partial last tile's padding excluded (the caller
        knows it without reading a device tensor). The spec's ``tile_offset`` does not locate a subset's tiles,
        so the formulas that hash positions from it (element signs, hashednet) are refused.
        """
        plan, spec = self.plan, self.spec
        if not plan.tiles_read_by_table:
            raise ValueError(
                f"{spec.name}: a subset of tiles is read through the tile tables only, which needs a tile "
                f"mapper ('stable' or 'roast') and sign 'tile' or 'none' (got mapper={plan.mapper!r}, "
                f"sign={plan.sign!r})."
            )
        n_tr, n_tc = spec.n_tile_rows(plan.tile), spec.n_tile_cols(plan.tile)
        tables = []
        for table in (self.tile_slot, self.tile_scale):
            grid = table.view(n_tr, n_tc)
            if axis == "rows":
                part = grid[tiles] if isinstance(tiles, slice) else grid.index_select(0, tiles)
            elif axis == "cols":
                part = grid[:, tiles] if isinstance(tiles, slice) else grid.index_select(1, tiles)
            else:
                raise ValueError(f"axis must be 'rows' or 'cols', got {axis!r}.")
            tables.append(part.reshape(-1))
        sub = replace(spec, rows=length) if axis == "rows" else replace(spec, cols=length)
        return replace(self, spec=sub, tile_slot=tables[0], tile_scale=tables[1])
