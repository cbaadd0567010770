"""What one arm of an experiment is, and how to build its model and count its storage.

An arm is one method at one budget: dense, hf-roast (a mapper, with or without embeddings),
magnitude pruning at hf-roast's budget, a smaller (truncated, optionally mean-pooled) model, or low-bit
integer weights (2:4 sparse x int4, or dense int3; QAT or round-to-nearest). Storage is counted the same way
for every arm: values and bytes, over the target modules and over the whole model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from hf_roast.compress import dense_weight
from hf_roast.config import RoastConfig
from hf_roast.mapping import tiles_along
from hf_roast.model import get_roast_model
from hf_roast.quant import QuantizedZ
from hf_roast.targets import find_targets, pattern_segments

from . import sparse_int4
from .baselines import magnitude_prune, parameter_bytes, round_to_nearest, truncate_layers
from .pooled import mean_pooled
from .training import rescale_to_dense_norm

METHODS = ("dense", "roast", "prune", "smaller", "narrower", "rtn", "floor", "smartdeal", "lowbit")
PRUNE_CRITERIA = ("magnitude", "random")
POOLINGS = ("cls", "mean")
SPARSITIES = (None, "2:4")
Z_GROUP_SIZE = 128
"""Values per scale of every quantised arm (a quantised z, and the round-to-nearest baseline)."""


@dataclass(frozen=True)
class Arm:
    """One row of a results table. ``name`` is its results file name, unique within an experiment."""

    name: str
    method: str
    compression: float = 1.0
    mapper: str = "stable"
    compress_embeddings: bool = False
    num_layers: int | None = None
    seed: int = 0
    schedule: float = 1.0
    distill: bool = False
    distill_hidden: float = 0.0  # with distill: weight of the hidden-state MSE against the teacher's layers
    recovery_steps: int = 0
    norm_init: bool = False
    lrs: tuple[float, ...] | None = field(default=None)
    steps: int | None = None
    recipe: tuple[float, float, float] | None = None
    # from scratch: every parameter outside the projections (embeddings, norms, LM head) trains at this fixed
    # rate and the arm's grid scans the projections' rate (z's, in weight units, for hf-roast); None: one
    # rate for every parameter
    rest_lr: float | None = None
    single_lr: bool = False
    calibrate: bool = False
    scaler: str = "v5"
    tile: tuple[int, int] = (32, 32)
    z_bits: int = 32  # roast: z trained through its 8/4-bit grid (QAT), served packed; rtn: the bits
    # roast: per-module budgets at the same total z as `compression` alone. (key, factor) pairs: the modules a key
    # matches (RoastConfig.compression_pattern's rules) are compressed `factor` times harder than the rest; the
    # absolute compressions are solved from the model's module sizes (see solve_compression_pattern)
    compression_pattern: tuple[tuple[str, float], ...] | None = None
    # roast: RoastConfig.module_balance (each module's dz scaled to a common running RMS before the sum)
    module_balance: bool = False
    # prune: which weights the fixed mask keeps at init, the largest ("magnitude") or a seeded draw ("random")
    prune_by: str = "magnitude"
    # from scratch, an arm without ``lrs``: the arm whose grid gives its rate (the grid's choice on the same
    # budget, its two best on a longer one); None: its method's grid at its compression, else at 8x
    grid_from: str | None = None
    # set by the harness, not by hand: the rate came from an unfinished grid_from arm (``--rate-from-partial``),
    # the best on validation among the rates it had finished, e.g. "1 of 2 rates"
    rate_from_partial: str | None = None
    # roast: SliceOut (RoastConfig.sliceout_keep / sliceout_mode): the fraction of each block's units
    # a training step computes; validation and held-out scoring run the full model
    sliceout_keep: float = 1.0
    sliceout_mode: str = "random"
    # smaller: the model's own [CLS] pooler ("cls"), or the mean of the unpadded tokens' states + a linear head
    pooling: str = "cls"
    # lowbit: "2:4" (magnitude, mask fixed at init) or None (every weight kept), and whether the codes are
    # trained (QAT, straight-through) or the fine-tuned dense weights are rounded once
    sparsity: str | None = None
    qat: bool = False
    # roast (and prune, language model): task-agnostic recovery (hf_roast.recover; pruning: the same loop):
    # the compressed model is distilled from its dense self on Wikipedia passages until this many non-padding
    # tokens, before the task (fine-tuning) or before perplexity is measured (language model); 0: none
    recover_tokens: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}: choose one of {METHODS}.")
        if self.method == "smaller" and self.num_layers is None:
            raise ValueError(f"Arm {self.name}: a 'smaller' arm needs num_layers.")
        if self.method == "smartdeal" and not self.compression > 1:
            raise ValueError(f"Arm {self.name}: a SmartDeal arm's compression is its bytes ratio, above 1.")
        if self.method == "rtn" and self.z_bits not in (8, 4):
            raise ValueError(f"Arm {self.name}: a round-to-nearest arm needs z_bits=8 or 4.")
        if self.pooling not in POOLINGS or (self.pooling != "cls" and self.method != "smaller"):
            raise ValueError(f"Arm {self.name}: pooling is one of {POOLINGS}, for smaller models.")
        if self.method == "lowbit" and not 2 <= self.z_bits <= 8:
            raise ValueError(f"Arm {self.name}: a low-bit arm needs 2 <= z_bits <= 8.")
        if self.sparsity not in SPARSITIES or (
            (self.sparsity is not None or self.qat) and self.method != "lowbit"
        ):
            raise ValueError(f"Arm {self.name}: sparsity (one of {SPARSITIES}) and qat are for low-bit arms.")
        if self.recipe is not None and (self.single_lr or self.method != "roast"):
            raise ValueError(
                f"Arm {self.name}: the fine-tuning recipe is for hf-roast arms without single_lr."
            )
        if self.distill_hidden and not (self.distill and self.distill_hidden > 0):
            raise ValueError(f"Arm {self.name}: distill_hidden is a positive weight, and needs distill=True.")
        if self.rest_lr is not None and not (self.rest_lr > 0 and self.recipe is None):
            raise ValueError(f"Arm {self.name}: rest_lr must be a positive rate, and excludes a recipe.")
        if self.compression_pattern is not None and self.method != "roast":
            raise ValueError(f"Arm {self.name}: a compression pattern is for hf-roast arms.")
        if self.module_balance and self.method != "roast":
            raise ValueError(f"Arm {self.name}: module_balance is for hf-roast arms.")
        if self.recover_tokens < 0 or (self.recover_tokens and self.method not in ("roast", "prune")):
            raise ValueError(
                f"Arm {self.name}: recover_tokens is a token budget (>= 0), for hf-roast and pruning arms."
            )
        if self.prune_by not in PRUNE_CRITERIA or (self.prune_by != "magnitude" and self.method != "prune"):
            raise ValueError(f"Arm {self.name}: prune_by is one of {PRUNE_CRITERIA}, for pruning arms.")

    @property
    def label(self) -> str:
        """The method's line in the plot (seeds, schedules and distillation are separate dimensions)."""
        if self.method == "roast":
            return (
                f"hf-roast {self.mapper}"
                + (f" x int{self.z_bits} (QAT)" if self.z_bits < 32 else "")
                + (" (+embeddings)" if self.compress_embeddings else "")
                + (" (norm-preserving init)" if self.norm_init else "")
                + (" (recovered before the task)" if self.recover_tokens else "")
            )
        if self.method == "prune":
            return f"{self.prune_by} pruning" + (" (+embeddings)" if self.compress_embeddings else "")
        if self.method == "floor":
            return "floor (no projection weights)"
        if self.method == "rtn":
            return f"round-to-nearest int{self.z_bits} (dense targets)"
        if self.method == "smaller":
            if self.pooling == "mean":
                return "smaller model, mean-pooled (first k layers)"
            return "smaller model (first k layers)"
        if self.method == "smartdeal":
            return "SmartDeal (power-of-two sparse C x int8 basis)"
        if self.method == "lowbit":
            return (
                ("2:4 sparse x " if self.sparsity else "")
                + f"int{self.z_bits}"
                + (" (QAT)" if self.qat else " (round-to-nearest)")
                + ", fp16 scales"
            )
        if self.method == "narrower":
            return "narrower model (same stored values)"
        return "dense"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["label"] = self.label
        d["lrs"] = list(self.lrs) if self.lrs else None
        d["recipe"] = list(self.recipe) if self.recipe else None
        d["tile"] = list(self.tile)
        d["compression_pattern"] = (
            [list(p) for p in self.compression_pattern] if self.compression_pattern else None
        )
        return d


def roast_config_for(arm: Arm, init: str = "pretrained") -> RoastConfig:
    return RoastConfig(
        compression=arm.compression,
        target_modules="all-linear",
        exclude_modules=["classifier", "score"],
        compress_embeddings=arm.compress_embeddings,
        mapper=arm.mapper if arm.method == "roast" else "stable",
        seed=arm.seed,
        init=init,
        z_bits=arm.z_bits if arm.method == "roast" and arm.z_bits < 32 else None,
        z_group_size=Z_GROUP_SIZE,
        z_qat=arm.method == "roast" and arm.z_bits < 32,
        module_balance=arm.module_balance,
        sliceout_keep=arm.sliceout_keep if arm.method == "roast" else 1.0,
        sliceout_mode=arm.sliceout_mode,
        sliceout_seed=arm.seed,
    )


def solve_compression_pattern(model: nn.Module, arm: Arm) -> tuple[float, dict[str, float]]:
    """(pooled compression, RoastConfig.compression_pattern) of a patterned arm, from ``model``'s module sizes.

    Each key's modules get ``factor`` times the compression of the unmatched (pooled) ones, and z keeps the
    length of the arm's plain ``compression`` to the tile: the segments' slot tiles are rounded so that they
    sum to the plain arm's, and each compression is set just below ``tiles / slot tiles`` so that the plan's
    ceil gives exactly those slot tiles.
    """
    config = roast_config_for(arm)
    tr, tc = config.tile
    t = tr * tc
    targets = find_targets(model, config)
    tiles = {
        name: tiles_along(w.shape[0], tr) * tiles_along(w.shape[1], tc)
        for name, module, kind in targets
        for w in [dense_weight(module, kind)]
    }
    factors = dict(arm.compression_pattern)
    claimed = pattern_segments(list(tiles), factors)
    keyed = {key: sum(tiles[n] for n in names) for key, (_, names) in claimed.items()}
    pooled = sum(tiles.values()) - sum(keyed.values())
    budget = math.ceil(
        math.ceil(sum(tiles.values()) * t / arm.compression) / t
    )  # slot tiles of the plain arm
    pooled_compression = (pooled + sum(g / factors[k] for k, g in keyed.items())) / budget
    slot_tiles = {k: min(g, max(1, round(g / (factors[k] * pooled_compression)))) for k, g in keyed.items()}
    pooled_tiles = budget - sum(slot_tiles.values())
    if pooled_tiles < 1 or pooled_tiles > pooled:
        raise ValueError(f"Arm {arm.name}: the pattern leaves the pooled modules {pooled_tiles} slot tiles.")
    pattern = {k: g * t / (slot_tiles[k] * t - 0.5) for k, g in keyed.items()}
    return pooled * t / (pooled_tiles * t - 0.5), pattern


def finish_training(model: nn.Module, arm: Arm) -> None:
    """What an arm does between training and evaluation: a QAT arm packs z (it is then served exactly as
    trained); the round-to-nearest baseline quantises the fine-tuned dense targets (post-training)."""
    if arm.method == "roast" and arm.z_bits < 32:
        model.quantize_z()
    elif arm.method == "rtn":
        round_to_nearest(model, roast_config_for(arm), arm.z_bits, Z_GROUP_SIZE)
    elif arm.method == "smartdeal":
        from .smartdeal_store import decode_in_place

        decode_in_place(model)
    elif arm.method == "lowbit":
        if not arm.qat:  # round-to-nearest (and a 2:4 mask, if any) from the fine-tuned dense weights
            install_lowbit(model, arm)
        sparse_int4.freeze(model)


def install_lowbit(model: nn.Module, arm: Arm) -> list:
    """Replace the target modules (those hf-roast would compress) by the arm's low-bit layers."""
    names = [name for name, _, _ in find_targets(model, roast_config_for(arm))]
    return sparse_int4.install(model, names, arm.z_bits, arm.sparsity == "2:4")


def lowbit_storage(model: nn.Module, arm: Arm) -> dict[str, int]:
    """Bytes the arm's target modules store (:func:`sparse_int4.packed_nbytes`, summed), from the dense model."""
    totals: dict[str, int] = {}
    for _, module, kind in find_targets(model, roast_config_for(arm)):
        rows, cols = dense_weight(module, kind).shape
        for k, v in sparse_int4.packed_nbytes(rows, cols, arm.z_bits, arm.sparsity == "2:4").items():
            totals[k] = totals.get(k, 0) + v
    return totals


def dense_target_values(model: nn.Module, arm: Arm) -> tuple[int, int]:
    """(values, bytes) of the modules hf-roast would compress in the *full* dense model."""
    targets = find_targets(model, roast_config_for(arm))
    n = sum(m.weight.numel() for _, m, _ in targets)
    b = sum(m.weight.numel() * m.weight.element_size() for _, m, _ in targets)
    return n, b


def roast_budget(model: nn.Module, arm: Arm) -> int:
    """The length of z hf-roast uses at this arm's compression: the number of values pruning may keep."""
    probe = copy.deepcopy(model)
    return get_roast_model(probe, roast_config_for(arm)).compression_report()["target"]["stored_parameters"]


def build_arm_model(model: nn.Module, arm: Arm, calibration_data=None) -> tuple[nn.Module, dict]:
    """Turn a freshly loaded dense model into the arm's model; returns it with its storage accounting.

    Storage keys: ``target_values`` / ``target_bytes`` (what the target modules store; for pruning the
    bytes include the sparsity pattern), ``model_values`` / ``model_bytes`` (the whole model), and for
    pruning the ``index_overhead_bytes`` and both pattern accountings.
    """
    dense_tv, dense_tb = dense_target_values(model, arm)
    dense_mv, dense_mb = parameter_bytes(model)
    dense_weights = _target_weights(model, arm) if arm.method in ("roast", "prune", "rtn", "lowbit") else None
    storage = {
        "dense_target_values": dense_tv,
        "dense_target_bytes": dense_tb,
        "dense_model_values": dense_mv,
    }
    storage["dense_model_bytes"] = dense_mb
    if arm.method == "dense":
        storage.update(
            target_values=dense_tv, target_bytes=dense_tb, model_values=dense_mv, model_bytes=dense_mb
        )
    elif arm.method == "roast":
        if arm.calibrate and calibration_data is None:
            raise ValueError(f"Arm {arm.name} calibrates its init, but no calibration_data was given.")
        config = roast_config_for(arm)
        if arm.compression_pattern:
            pooled, pattern = solve_compression_pattern(model, arm)
            config = dataclasses.replace(config, compression=pooled, compression_pattern=pattern)
            storage["compression_pattern"] = {"pooled": pooled, **pattern}
        model = get_roast_model(model, config, calibration_data=calibration_data if arm.calibrate else None)
        if arm.norm_init:
            dense_sq = sum(float(w.double().pow(2).sum()) for w in dense_weights.values())
            storage["norm_init_factor"] = rescale_to_dense_norm(model.base_model, dense_sq)
        storage["init_relative_error"] = relative_error(
            dense_weights, {n: layer.materialize_weight() for n, layer in model.roast_layers()}
        )
        report = model.compression_report()
        # a QAT arm holds an fp32 master while it trains, and stores (and serves) z packed
        packed = report["z_bytes"]
        if arm.z_bits < 32:
            packed = QuantizedZ.packed_nbytes(report["target"]["stored_parameters"], arm.z_bits, Z_GROUP_SIZE)
        saving = report["z_bytes"] - packed
        storage.update(
            target_values=report["target"]["stored_parameters"],
            target_bytes=report["target"]["stored_bytes"] - saving,
            model_values=report["model"]["stored_parameters"],
            model_bytes=report["model"]["stored_bytes"] - saving,
            index_overhead_bytes=0,
        )
    elif arm.method == "prune":
        keep = roast_budget(model, arm)
        pruned = magnitude_prune(model, roast_config_for(arm), keep)
        storage["init_relative_error"] = relative_error(dense_weights, _target_weights(model, arm))
        other_values, other_bytes = dense_mv - dense_tv, dense_mb - dense_tb
        storage.update(
            target_values=pruned["kept_values"],
            target_bytes=pruned["stored_bytes"],
            target_bytes_values_only=pruned["values_bytes"],
            target_bytes_bitmask=pruned["values_bytes"] + pruned["bitmask_bytes"],
            target_bytes_csr=pruned["values_bytes"] + pruned["csr_index_bytes"],
            model_values=other_values + pruned["kept_values"],
            model_bytes=other_bytes + pruned["stored_bytes"],
            model_bytes_values_only=other_bytes + pruned["values_bytes"],
            index_overhead_bytes=pruned["index_overhead_bytes"],
            index_format=pruned["index_format"],
            bitmask_bytes=pruned["bitmask_bytes"],
            csr_index_bytes=pruned["csr_index_bytes"],
        )
    elif arm.method == "rtn":  # the dense model trains; finish_training quantises its targets
        stored = sum(
            QuantizedZ.packed_nbytes(w.numel(), arm.z_bits, Z_GROUP_SIZE) for w in dense_weights.values()
        )
        storage.update(
            target_values=dense_tv,
            target_bytes=stored,
            model_values=dense_mv,
            model_bytes=dense_mb - dense_tb + stored,
            index_overhead_bytes=0,
        )
    elif arm.method == "smartdeal":  # each target in compression-times fewer bytes than its fp32 weight
        from .smartdeal import compress_model

        report = compress_model(model, find_targets(model, roast_config_for(arm)), arm.compression)
        storage.update(
            target_values=report["kept_coefficients"] + report["basis_values"],
            target_bytes=report["stored_bytes"],
            model_values=dense_mv - dense_tv + report["kept_coefficients"] + report["basis_values"],
            model_bytes=dense_mb - dense_tb + report["stored_bytes"],
            index_overhead_bytes=0,
            init_relative_error=report["init_relative_error"],
            smartdeal_layout=report["layout"],
        )
    elif arm.method == "lowbit":
        packed = lowbit_storage(model, arm)
        if (
            arm.qat
        ):  # the layers train from the pre-trained weights; round-to-nearest installs them at the end
            layers = install_lowbit(model, arm)
            with torch.no_grad():
                stored = {n: layer.stored_weight().float() for n, layer in zip(dense_weights, layers)}
            storage["init_relative_error"] = relative_error(dense_weights, stored)
        storage.update(
            target_values=packed["kept_values"],
            target_bytes=packed["total"],
            target_bytes_values_only=packed["codes"],
            model_values=dense_mv - dense_tv + packed["kept_values"],
            model_bytes=dense_mb - dense_tb + packed["total"],
            index_overhead_bytes=packed["index"],
            scale_bytes=packed["scales"],
        )
        if arm.sparsity:
            storage["index_format"] = "2:4, 2-bit position per kept value"
    elif arm.method == "smaller":
        model = truncate_layers(model, arm.num_layers)
        if arm.pooling == "mean":
            model = mean_pooled(model)
        # with no layer and no pooler, the mean-pooled model has no projection left to count
        no_targets = arm.pooling == "mean" and arm.num_layers == 0
        tv, tb = (0, 0) if no_targets else dense_target_values(model, arm)
        mv, mb = parameter_bytes(model)
        storage.update(
            target_values=tv, target_bytes=tb, model_values=mv, model_bytes=mb, index_overhead_bytes=0
        )
    # a 0-layer mean-pooled model stores no target module at all: infinitely fewer bytes of them
    storage["target_ratio"] = dense_tv / storage["target_values"] if storage["target_values"] else math.inf
    storage["target_bytes_ratio"] = (
        dense_tb / storage["target_bytes"] if storage["target_bytes"] else math.inf
    )
    storage["model_bytes_ratio"] = dense_mb / storage["model_bytes"]
    return model, storage


@torch.no_grad()
def _target_weights(model: nn.Module, arm: Arm) -> dict[str, torch.Tensor]:
    """The target modules' weights (``out x in``), copied, keyed by module name."""
    return {
        name: dense_weight(module, kind).detach().float().clone()
        for name, module, kind in find_targets(model, roast_config_for(arm))
    }


@torch.no_grad()
def relative_error(dense: dict[str, torch.Tensor], compressed: dict[str, torch.Tensor]) -> float:
    """``||W' - W||_F / ||W||_F`` over all target weights together, right after compression.

    It says how much of the pre-trained weights a method keeps before any training: least squares at
    c-fold random sharing keeps about ``1/c`` of each weight (error about ``sqrt(1 - 1/c)``), while
    magnitude pruning drops only the smallest weights.
    """
    if dense.keys() != compressed.keys():
        raise ValueError(f"module sets differ: {sorted(dense.keys() ^ compressed.keys())[:4]}")
    err = sum(float((compressed[n].double() - w.double()).pow(2).sum()) for n, w in dense.items())
    ref = sum(float(w.double().pow(2).sum()) for w in dense.values())
    return (err / ref) ** 0.5
