"""SliceOut for ROAST layers: each training step computes only some tile-aligned units of every block.

A block is an attention or an MLP, found by the names of its linear layers (:data:`LAYOUTS`, one row per layout):

* Llama-style: attention ``q_proj``, ``k_proj``, ``v_proj`` -> ``o_proj``; MLP ``gate_proj``, ``up_proj`` ->
  ``down_proj``;
* BERT-style (a ``BertLayer``, and the encoders that copy it): attention ``attention.self.query``, ``.key``,
  ``.value`` -> ``attention.output.dense``; MLP ``intermediate.dense`` -> ``output.dense``.

Its *consumer* (o / down / output dense) sums over its input units; its *producers* (q, k, v / gate, up /
intermediate dense) compute them. A training step keeps ``K = round(keep * N)`` of the block's ``N`` units:

* the consumer reads only the kept units' tile columns of its W, and rescales its sum by ``N / K`` (the
  dropout rescale: with a uniform random subset it is an unbiased estimate of the full sum);
* each producer computes only the tile rows of its W whose outputs reach a kept unit, and writes zeros for
  the rest (they are never read: the consumer drops those columns).

Tensor shapes never change (a producer's output keeps its full width), so the code between the layers (RoPE,
attention, activations, norms, residuals) runs as it is: a dropped head's q, k and v are zeros (so is its
attention output), and the consumer drops its columns anyway; a dropped MLP unit's activation is dropped likewise.

So the weight gather from z, the matmul and the scatter of dz all shrink to the kept tiles, on every
execution path: a step reads a layer through compacted tile tables (:meth:`LayerMapping.select_tiles`), and a
ROAST tile is its own span of z, so a random set of tile rows costs what a contiguous slice costs.

Units are tile-aligned, so a dropped unit owns whole tiles of every matrix of its block:

* MLP: ``lcm(tile rows, tile cols)`` consecutive hidden units (32 with the default 32 x 32 tile); the last unit
  may be shorter (a partial last tile);
* attention: the fewest whole key/value groups (a key/value head with the query heads that read it; one head
  each in BERT, which has as many key/value heads as heads) whose rows fill whole tiles of q, k, v and whose
  columns fill whole tile columns of o; a unit's heads are dropped from all four. A block with a single unit
  (heads narrower than a tile, one group) is never sliced.

The mask of block ``b`` at step ``s`` is drawn from a generator seeded by ``(seed, s, b)``: every layer of the
block reads the same mask, and a forward recomputed by gradient checkpointing drops the same units. The step
advances at each training-mode forward of the model (a pre-hook on the module that holds the store).

In eval mode (``model.eval()``), or at ``keep == 1``, layers take exactly the path they take without SliceOut.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backends.dispatch import roast_linear
from .checkpoint_format import STORE_NAME
from .layers import RoastLinear, RoastStore
from .mapping import LayerMapping, tiles_along
from .vocab import SLICEOUT_MODES, check_choice, check_keep_fraction


@dataclass(frozen=True)
class BlockLayout:
    """Where one kind of block keeps its linear layers: dotted paths from the block's *container* (the module
    found to hold them all: a Llama attention or MLP module, a ``BertLayer``)."""

    family: str  # "Llama" / "BERT", for messages
    kind: str  # "attention" (producers q, k, v in this order) or "mlp"
    producers: tuple[str, ...]  # compute the units: SliceOut keeps their tile rows
    consumer: str  # sums over the units: SliceOut keeps its tile columns and rescales
    optional: tuple[str, ...] = ()  # producers a container may lack

    def describe(self) -> str:
        return f"{self.family} {self.kind} ({', '.join(self.producers)} -> {self.consumer})"


LAYOUTS = (
    BlockLayout("Llama", "attention", ("q_proj", "k_proj", "v_proj"), "o_proj"),
    BlockLayout("Llama", "mlp", ("gate_proj", "up_proj"), "down_proj", optional=("gate_proj",)),
    BlockLayout(
        "BERT",
        "attention",
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        "attention.output.dense",
    ),
    BlockLayout("BERT", "mlp", ("intermediate.dense",), "output.dense"),
)
"""The block layouts SliceOut finds, tried in this order on every module of the model. A module is a block's
container when it holds the consumer (compressed) and every producer not optional; a module may contain several
blocks (a ``BertLayer``: its attention and its MLP). A block is named after the deepest module that holds all its
layers (``...self_attn``, ``...mlp``; ``...layer.0.attention`` and ``...layer.0`` in BERT)."""


def kept_count(keep: float, n_units: int) -> int:
    """How many of ``n_units`` a step keeps: ``round(keep * n)``, at least one."""
    return min(n_units, max(1, round(keep * n_units)))


@dataclass(frozen=True)
class Cut:
    """What one layer computes at one step: the kept tile rows (``axis="rows"``, a producer) or tile columns
    (``"cols"``, a consumer) of its W, as tile indices and as the element rows / columns they hold."""

    axis: str
    tiles: torch.Tensor | slice
    units: torch.Tensor | slice
    length: int  # how many element rows / columns are kept
    size: int  # the layer's full extent along axis
    scale: float  # N / K on a consumer's sum; 1.0 on a producer


@dataclass(frozen=True)
class Member:
    """A layer's place in its block: which axis it slices and how many of its tiles make one unit."""

    axis: str
    tiles_per_unit: int


class SliceBlock:
    """One attention or MLP block: its number of units and the mask of the current step, shared by its layers."""

    def __init__(self, sliceout: SliceOut, index: int, name: str, n_units: int):
        self.sliceout = sliceout
        self.index = index
        self.name = name
        self.n_units = n_units
        self._step: int | None = None
        self._kept: torch.Tensor | tuple[int, int] | None = None
        self._cuts: dict[tuple, Cut] = {}

    def kept_units(self) -> torch.Tensor | tuple[int, int] | None:
        """This step's kept units: sorted int64 indices (random), ``(start, stop)`` (contiguous), or None
        (nothing dropped). Drawn once per step from the seeded generator."""
        so = self.sliceout
        if self._step != so.step:
            self._step, self._cuts = so.step, {}
            self._kept = so.draw(self.index, self.n_units)
        return self._kept

    def cut(self, member: Member, layer_map: LayerMapping) -> Cut | None:
        """The layer's :class:`Cut` this step (cached per step for the layers that share its shape), or None."""
        kept = self.kept_units()
        if kept is None:
            return None
        spec, tile = layer_map.spec, layer_map.plan.tile
        rows = member.axis == "rows"
        t = tile[0] if rows else tile[1]
        size = spec.rows if rows else spec.cols
        device = layer_map.tile_scale.device
        key = (member, t, size, device)
        cut = self._cuts.get(key)
        if cut is None:
            cut = self._cuts[key] = _cut_of(kept, member, t, size, self.n_units, device)
        return cut


def _cut_of(
    kept: torch.Tensor | tuple[int, int], member: Member, t: int, size: int, n_units: int, device
) -> Cut:
    """Tile and element indices of the kept units along one layer's axis (tile size ``t``, extent ``size``)."""
    tpu = member.tiles_per_unit
    n_tiles = tiles_along(size, t)
    if isinstance(kept, tuple):
        start, stop = kept
        n_kept = stop - start
        first, end = start * tpu, min(stop * tpu, n_tiles)
        tiles, units = slice(first, end), slice(first * t, min(end * t, size))
        length = units.stop - units.start
    else:
        n_kept = len(kept)
        tile_ids = (kept[:, None] * tpu + torch.arange(tpu)).flatten()
        tile_ids = tile_ids[tile_ids < n_tiles]
        unit_ids = (tile_ids[:, None] * t + torch.arange(t)).flatten()
        unit_ids = unit_ids[unit_ids < size]
        length = len(unit_ids)
        tiles, units = tile_ids.to(device), unit_ids.to(device)
    scale = n_units / n_kept if member.axis == "cols" else 1.0
    return Cut(member.axis, tiles, units, length, size, scale)


class SliceSite:
    """What a sliced :class:`~hf_roast.layers.RoastLinear` holds (unregistered, as ``_sliceout``): its block
    and its place in it. The layer asks it for its output in training mode."""

    def __init__(self, block: SliceBlock, member: Member):
        self.block = block
        self.member = member

    def linear(
        self,
        x: torch.Tensor,
        z,
        bias: torch.Tensor | None,
        layer_map: LayerMapping,
        backend: str,
    ) -> torch.Tensor | None:
        """The layer's output with this step's cut, or None when nothing is dropped (the caller runs the
        unsliced path, bit for bit)."""
        cut = self.block.cut(self.member, layer_map)
        if cut is None:
            return None
        return sliced_linear(x, z, bias, layer_map, backend, cut)


def sliced_linear(
    x: torch.Tensor, z, bias: torch.Tensor | None, layer_map: LayerMapping, backend: str, cut: Cut
) -> torch.Tensor:
    """``x W^T + b`` computing only the cut's tiles of W.

    Rows (a producer): the kept outputs, zeros elsewhere. Columns (a consumer): the kept inputs' contribution,
    times ``cut.scale``, plus the whole bias (a bias is not a sum over units)."""
    sub = layer_map.select_tiles(cut.axis, cut.tiles, cut.length)
    contiguous = isinstance(cut.units, slice)
    if cut.axis == "rows":
        if bias is not None:
            bias = bias[cut.units] if contiguous else bias.index_select(0, cut.units)
        y = roast_linear(x, z, bias, sub, backend)
        if contiguous:
            return F.pad(y, (cut.units.start, cut.size - cut.units.stop))
        return y.new_zeros(*y.shape[:-1], cut.size).index_copy(-1, cut.units, y)
    kept_x = x[..., cut.units] if contiguous else x.index_select(-1, cut.units)
    y = roast_linear(kept_x, z, None, sub, backend) * cut.scale
    return y if bias is None else y + bias.to(y.dtype)


class SliceOut:
    """SliceOut's state for one model: the keep fraction, the mode, the seed, the step and the blocks.

    Change ``keep`` (or ``mode``) between steps freely (:class:`hf_roast.optim.SliceOutCallback` does, per step);
    ``step`` counts the model's training-mode forwards (set it to resume a run's masks)."""

    def __init__(self, keep: float = 1.0, mode: str = "random", seed: int = 0):
        self.keep = keep
        self.mode = mode
        self.seed = seed
        self.step = 0
        self.blocks: list[SliceBlock] = []
        self.skipped: list[str] = []  # blocks found but not sliceable (one unit), by name

    @property
    def keep(self) -> float:
        return self._keep

    @keep.setter
    def keep(self, value: float) -> None:
        self._keep = check_keep_fraction(value)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        check_choice("sliceout_mode", value, SLICEOUT_MODES)
        self._mode = value

    def advance(self) -> None:
        """A new training step: every block draws a new mask at its next call."""
        self.step += 1

    def draw(self, block: int, n_units: int) -> torch.Tensor | tuple[int, int] | None:
        """Block ``block``'s kept units at the current step (see :meth:`SliceBlock.kept_units`)."""
        k = kept_count(self.keep, n_units)
        if k >= n_units:
            return None
        digest = hashlib.sha256(f"sliceout:{self.seed}:{self.step}:{block}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        if self.mode == "random":
            return torch.randperm(n_units, generator=generator)[:k].sort().values
        start = int(torch.randint(0, n_units - k + 1, (1,), generator=generator))
        return start, start + k

    def __repr__(self) -> str:
        return (
            f"SliceOut(keep={self.keep}, mode={self.mode!r}, seed={self.seed}, step={self.step}, "
            f"blocks={len(self.blocks)}, skipped={len(self.skipped)})"
        )


def _store_root(model: nn.Module) -> tuple[nn.Module, RoastStore]:
    """The module that holds the store (the HF model, also inside a RoastModel wrapper) and the store."""
    for module in model.modules():
        store = module._modules.get(STORE_NAME)
        if isinstance(store, RoastStore):
            return module, store
    raise ValueError("SliceOut needs a model compressed by hf_roast (get_roast_model): no ROAST store found.")


def _sliceable(module: nn.Module | None) -> bool:
    return isinstance(module, RoastLinear) and module.spec.kind == "linear"


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    """``module``'s submodule at a dotted path, or None."""
    for part in path.split("."):
        module = module._modules.get(part) if module is not None else None
    return module


def _head_dim(owners: list[nn.Module], q: nn.Module) -> int:
    """The head size, from the first of ``owners`` (the attention modules: a Llama attention; a BERT
    attention's self-attention) that tells it (``head_dim``, ``attention_head_size``, or its config's
    ``head_dim`` or ``num_attention_heads``)."""
    for owner in owners:
        for attribute in ("head_dim", "attention_head_size"):
            head_dim = getattr(owner, attribute, None)
            if isinstance(head_dim, int):
                break
        else:
            config = getattr(owner, "config", None)
            heads = getattr(config, "num_attention_heads", None)
            head_dim = getattr(config, "head_dim", None) or (q.out_features // heads if heads else None)
        if isinstance(head_dim, int) and head_dim >= 1:
            return head_dim
    raise ValueError(f"SliceOut cannot tell the head size of {type(owners[0]).__name__}.")


def _attention_units(
    owners: list[nn.Module], q: nn.Module, k: nn.Module, tile: tuple[int, int]
) -> tuple[int, Member, Member, Member] | None:
    """(units, the q member, the k and v member, the o member) of an attention block, or None when it has one
    unit only. ``owners``: the modules that may tell the head size (see :func:`_head_dim`)."""
    hd = _head_dim(owners, q)
    heads, kv_heads = q.out_features // hd, k.out_features // hd
    if heads * hd != q.out_features or kv_heads * hd != k.out_features or heads % kv_heads:
        raise ValueError(f"SliceOut: {type(owners[0]).__name__}'s projections are not whole heads of {hd}.")
    n_rep = heads // kv_heads
    tr, tc = tile
    for groups in range(1, kv_heads):
        if (groups * hd) % tr == 0 and (groups * n_rep * hd) % tr == 0 and (groups * n_rep * hd) % tc == 0:
            break
    else:
        return None
    q_member = Member("rows", groups * n_rep * hd // tr)
    kv_member = Member("rows", groups * hd // tr)
    o_member = Member("cols", groups * n_rep * hd // tc)
    return -(-kv_heads // groups), q_member, kv_member, o_member


def _mlp_units(consumer: nn.Module, tile: tuple[int, int]) -> tuple[int, Member, Member] | None:
    """(units, the producers' member, the consumer's member) of an MLP block, or None when it has one unit
    only."""
    unit = math.lcm(*tile)
    n_units = -(-consumer.in_features // unit)
    if n_units < 2:
        return None
    return n_units, Member("rows", unit // tile[0]), Member("cols", unit // tile[1])


def _block_members(
    layout: BlockLayout, container: nn.Module, tile: tuple[int, int]
) -> tuple[int, dict[str, Member]] | None:
    """(units, member of each path) of the layout's block in ``container``, or None when it has one unit only."""
    consumer = _submodule(container, layout.consumer)
    if layout.kind == "attention":
        q_path, k_path, v_path = layout.producers
        q = _submodule(container, q_path)
        owners = [container]
        parent = _submodule(container, q_path.rpartition(".")[0]) if "." in q_path else container
        if parent is not container:
            owners.insert(0, parent)  # BERT: the self-attention tells the head size
        found = _attention_units(owners, q, _submodule(container, k_path), tile)
        if found is None:
            return None
        n_units, q_member, kv_member, o_member = found
        members = {q_path: q_member, k_path: kv_member, v_path: kv_member}
    else:
        found = _mlp_units(consumer, tile)
        if found is None:
            return None
        n_units, producer_member, o_member = found
        members = dict.fromkeys(layout.producers, producer_member)
    members[layout.consumer] = o_member
    return n_units, members


def _holds(container: nn.Module, layout: BlockLayout) -> bool:
    """Whether ``container`` holds the layout's block: a compressed consumer, every producer not optional, and
    the widths agree (q / each MLP producer writes as many outputs as the consumer reads)."""
    consumer = _submodule(container, layout.consumer)
    if not _sliceable(consumer):
        return False
    widths = []
    for i, path in enumerate(layout.producers):
        producer = _submodule(container, path)
        if producer is None:
            if path not in layout.optional:
                return False
        elif layout.kind == "mlp" or i == 0:  # attention: k and v may be narrower (grouped heads)
            widths.append(getattr(producer, "out_features", consumer.in_features))
    return all(w == consumer.in_features for w in widths)


def _block_name(container_name: str, paths: list[str]) -> str:
    """The name of the deepest module holding all of ``paths`` (dotted, from the container)."""
    common = []
    for parts in zip(*(p.split(".")[:-1] for p in paths)):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(n for n in (container_name, *common) if n)


def _layouts_text() -> str:
    return "; ".join(layout.describe() for layout in LAYOUTS)


def enable_sliceout(model: nn.Module, keep: float, mode: str = "random", seed: int = 0) -> SliceOut:
    """Switch SliceOut on for ``model`` (a compressed HF model, or a RoastModel) and return its state.

    Finds every block of a known layout (:data:`LAYOUTS`: Llama-style ``q/k/v_proj -> o_proj`` and
    ``gate/up_proj -> down_proj``; BERT-style ``attention.self.query/key/value -> attention.output.dense`` and
    ``intermediate.dense -> output.dense``) whose consumer is a ROAST linear layer, attaches the block's mask to
    its ROAST layers, and counts steps with a forward pre-hook on the module that holds the store. Called again,
    it only changes ``keep``, ``mode`` and ``seed``. ``keep=1`` computes the full model, bit for bit as without
    SliceOut."""
    root, store = _store_root(model)
    state = store.__dict__.get("sliceout")
    if state is not None:
        state.keep, state.mode, state.seed = keep, mode, seed
        return state
    plan = store.plan
    if not plan.tiles_read_by_table:
        raise ValueError(
            f"SliceOut computes whole tiles read through the tile tables: it needs mapper 'stable' or 'roast' "
            f"and sign 'tile' or 'none' (this model has mapper={plan.mapper!r}, sign={plan.sign!r})."
        )
    state = SliceOut(keep, mode, seed)
    for name, module in root.named_modules():
        for layout in LAYOUTS:
            if not _holds(module, layout):
                continue
            paths = [p for p in (*layout.producers, layout.consumer) if _submodule(module, p) is not None]
            block_name = _block_name(name, paths)
            found = _block_members(layout, module, plan.tile)
            if found is None:
                state.skipped.append(block_name)
                continue
            n_units, members = found
            block = SliceBlock(state, len(state.blocks), block_name, n_units)
            state.blocks.append(block)
            for path, member in members.items():
                layer = _submodule(module, path)
                if _sliceable(layer):
                    object.__setattr__(layer, "_sliceout", SliceSite(block, member))
    if not state.blocks:
        raise ValueError(
            f"SliceOut found no block to slice: it knows {_layouts_text()}, and needs blocks whose consumer "
            "(o_proj / down_proj, attention.output.dense / output.dense) is compressed and spans at least two "
            f"tile-aligned units (skipped for a single unit: {state.skipped[:4]}). A smaller `tile` gives more "
            "units."
        )
    if state.skipped:
        warnings.warn(
            f"SliceOut leaves {len(state.skipped)} block(s) whole, each one tile-aligned unit only (e.g. "
            f"{state.skipped[0]!r}: heads narrower than the {plan.tile} tile); a smaller `tile` slices them.",
            stacklevel=2,
        )
    root.register_forward_pre_hook(_advance_hook(state))
    store.__dict__["sliceout"] = state
    return state


def _advance_hook(state: SliceOut):
    def hook(module: nn.Module, args) -> None:
        if module.training:
            state.advance()

    return hook


def sliceout_state(model: nn.Module) -> SliceOut | None:
    """The model's :class:`SliceOut` state, or None when it was never enabled."""
    return _store_root(model)[1].__dict__.get("sliceout")
