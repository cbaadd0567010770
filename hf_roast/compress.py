"""Module conversion, both ways: dense -> ROAST in place, the skeleton of a saved one, and ROAST -> dense.

One path per job: :func:`compress_model` (plan, initialise z, swap modules) for a dense model,
:func:`apply_plan` (swap modules only, z left to the loader) for a checkpoint, and :func:`merge_model`
(materialise every layer into its dense module, drop the store) for ``merge_and_unload``. Every swap
goes through :func:`replace_module`.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import column_weights, input_statistics, normalized_gram, output_error_solve
from .checkpoint_format import STORE_NAME
from .config import RoastConfig
from .initialization import LeastSquaresZ, random_z
from .layers import RoastEmbedding, RoastLinear, RoastStore, default_init_std, roast_layers
from .mapping import LayerMapping, MappingPlan, ModuleSpec
from .targets import find_targets, module_kind, pattern_segments
from .vocab import CALIBRATIONS


def dense_weight(module: nn.Module, kind: str) -> torch.Tensor:
    """The weight as ``rows x cols`` (``out x in``; Conv1D stores it transposed)."""
    return module.weight.t() if kind == "conv1d" else module.weight


def _power_of_two(x: float) -> float:
    """Nearest power of two: scaling by it is exact in floating point, so 1x recovery is bit-exact."""
    return 2.0 ** round(math.log2(x)) if x > 0 and math.isfinite(x) else 1.0


def _module_std(module: nn.Module, kind: str, materialized: bool) -> float:
    if not materialized:
        return default_init_std(module)
    w = dense_weight(module, kind).detach().float()
    std = w.std().item() if w.numel() > 1 else abs(w.item())
    return std if std > 0 and math.isfinite(std) else default_init_std(module)


def _z_scale(stds: list[float], sizes: list[int]) -> float:
    """The std of z: a power of two near the size-weighted RMS of the module stds (exact rescaling)."""
    rms = math.sqrt(sum(n * s * s for s, n in zip(stds, sizes)) / max(1, sum(sizes)))
    return _power_of_two(rms)


def _check_tied_embeddings(model: nn.Module, targets) -> None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None or not hasattr(out, "weight"):
        return
    for name, module, kind in targets:
        if kind == "embedding" and getattr(module, "weight", None) is out.weight:
            raise ValueError(
                f"{name} is tied to the output layer (tie_word_embeddings), and compressing tied embeddings is not "
                f"supported yet: add {name!r} to exclude_modules, or set compress_embeddings=False."
            )


def compress_model(
    model: nn.Module,
    config: RoastConfig,
    show_progress: bool | None = None,
    calibration_data: Iterable | None = None,
    calibration: str = "output",
    calibration_iterations: int = 50,
    calibration_damping: float = 0.01,
) -> RoastStore:
    """Compress ``model`` in place; returns the store that owns z.

    With ``calibration_data`` (a few batches of model inputs), the pretrained projection is fitted to
    what the data reads (:mod:`hf_roast.calibration`): ``calibration="diagonal"`` weights each input
    column by its mean squared activation; ``"output"`` (the default) then minimises every layer's
    output error ``||(W' - W) x||^2`` on the calibration inputs by conjugate gradients.
    """
    if hasattr(model, STORE_NAME):
        raise ValueError(
            "This model is already ROAST-compressed: call merge_and_unload() first to recompress it."
        )
    targets = find_targets(model, config)
    _check_tied_embeddings(model, targets)
    materialized = all(m.weight.device.type != "meta" for _, m, _ in targets)
    init = config.init if config.init != "auto" else ("pretrained" if materialized else "random")
    if init == "pretrained" and not materialized:
        raise ValueError(
            "init='pretrained' needs the dense weights, but they are on the meta device: load them first."
        )
    if calibration_data is not None and init != "pretrained":
        raise ValueError(
            f"calibration_data weights the projection of pretrained weights, but init resolves to {init!r}: "
            "drop calibration_data, or load the dense weights and use init='pretrained'."
        )
    if calibration not in CALIBRATIONS:
        raise ValueError(f"Unknown calibration {calibration!r}: choose one of {', '.join(CALIBRATIONS)}.")
    stats = (
        input_statistics(
            model, targets, calibration_data, full=calibration == "output", show_progress=bool(show_progress)
        )
        if calibration_data is not None
        else {}
    )
    moments = {n: g.diagonal() if g.ndim == 2 else g for n, g in stats.items()}
    stds = [_module_std(module, kind, materialized) for _, module, kind in targets]
    z_std = _z_scale(stds, [dense_weight(m, k).numel() for _, m, k in targets])
    specs = []
    for (name, module, kind), std in zip(targets, stds):
        rows, cols = dense_weight(module, kind).shape
        # lambda_l = target std / std of z. z's own std is the typical module std, so every lambda is near 1
        # and Adam's per-element steps on z move W about as fast as dense fine-tuning moves it.
        scale = _power_of_two(std) / z_std if init == "pretrained" else std / z_std
        specs.append(ModuleSpec(name=name, kind=kind, rows=rows, cols=cols, scale=scale))
    plan = MappingPlan.build(
        specs,
        mapper=config.mapper,
        sign=config.sign,
        seed=config.seed,
        tile=config.tile,
        compression=config.compression,
        num_parameters=config.num_parameters,
        segments=pattern_segments([name for name, _, _ in targets], config.compression_pattern),
    )
    device = targets[0][1].weight.device
    # float z (or the QAT master) while it is fitted; packed at the end when config.z_bits asks for it
    store = RoastStore.from_config(plan, config, device, fitting=True)
    if show_progress is None:
        show_progress = plan.num_compressed >= 20_000_000
    least_squares = LeastSquaresZ(plan, device) if init == "pretrained" else None
    # plan -> initialise z -> swap, module by module: each dense weight is folded into the least-squares sums
    # and then replaced, so no more than one module's dense copy is added to the model's peak memory
    for (name, module, kind), spec in tqdm(
        list(zip(targets, specs)), desc="ROAST compress", unit="module", disable=not show_progress
    ):
        if least_squares is not None:
            w = dense_weight(module, kind)
            # importance of each weight: 1 for plain least squares, its column's weight when calibrated
            importance = column_weights(moments[name].to(w.device))[None, :] if name in moments else None
            least_squares.add(spec, w, importance)
        replace_module(model, name, _roast_layer_like(module, kind, store, spec, copy_values=materialized))
        release_free_heap()
    with torch.no_grad():
        z = least_squares.solve() if least_squares is not None else random_z(plan, z_std, config.seed, device)
        if init == "pretrained" and calibration == "output" and stats:
            solve_modules = [
                (
                    LayerMapping.build(plan, spec, device),
                    dense_weight(module, kind).detach().float(),
                    normalized_gram(stats[name], calibration_damping).to(device) if name in stats else None,
                )
                for (name, module, kind), spec in zip(targets, specs)
            ]
            z, store.calibration_report = output_error_solve(
                z,
                solve_modules,
                plan.num_slots,
                calibration_iterations,
                show_progress=bool(show_progress),
                backend=store.backend,
            )
        store.z.copy_(z.to(store.z.dtype))
    model.add_module(STORE_NAME, store)
    store.rebuild()
    if config.z_packed:  # post-training quantisation of the fitted z
        store.quantize_(config.z_bits, config.z_group_size)
    release_free_heap()
    return store


def release_free_heap() -> None:
    """Give memory that is already free back to the OS (glibc only; a no-op elsewhere).

    Compressing frees each dense weight and a few module-sized temporaries per module. Once a large
    block has been freed, glibc raises its mmap threshold (up to 32 MiB), so later module-sized blocks come
    from the heap, and small long-lived allocations (the new layers' tables) pin it: without trimming,
    compressing a 134M-parameter Llama left about 3.6 GiB of free but resident heap (RSS 4.1 GiB; 0.5 GiB
    after ``malloc_trim``), which then counted against training memory.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # musl and other C libraries have no malloc_trim
        return None


def _roast_layer_like(module: nn.Module, kind: str, store: RoastStore, spec: ModuleSpec, copy_values: bool):
    """A Roast layer standing in for ``module``; copies the dense bias / padding row when they are real."""
    w = module.weight
    device = None if w.device.type == "meta" else w.device
    if kind == "embedding":
        layer = RoastEmbedding(
            module.num_embeddings,
            module.embedding_dim,
            store,
            spec,
            module.padding_idx,
            dtype=w.dtype,
            device=device,
        )
        if copy_values and layer.padding_idx is not None:
            layer.padding_row.copy_(w.detach()[layer.padding_idx])
        return layer
    out_features, in_features = spec.rows, spec.cols
    has_bias = getattr(module, "bias", None) is not None
    layer = RoastLinear(in_features, out_features, store, spec, bias=has_bias, dtype=w.dtype, device=device)
    if has_bias:
        if copy_values:
            layer.bias.data.copy_(module.bias.detach())
        elif module.bias.device.type == "meta":
            layer.bias = nn.Parameter(torch.empty_like(module.bias, device="meta"))
    layer.train(module.training)
    return layer


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of ``model``'s submodule with dotted name ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_plan(model: nn.Module, config: RoastConfig, plan: MappingPlan, device="meta") -> RoastStore:
    """Swap the plan's modules into a freshly built skeleton; z is left empty on ``device`` for a loader."""
    store = RoastStore.from_config(plan, config, device)
    for spec in plan.modules:
        try:
            module = model.get_submodule(spec.name)
        except AttributeError:
            raise ValueError(
                f"The checkpoint compresses module {spec.name!r}, which {type(model).__name__} does not have: the "
                "checkpoint's module list does not match this architecture."
            ) from None
        kind = module_kind(module)
        shape = tuple(dense_weight(module, kind).shape) if kind else None
        if kind != spec.kind or shape != (spec.rows, spec.cols):
            raise ValueError(
                f"The checkpoint's module {spec.name!r} is a {spec.kind} of shape {(spec.rows, spec.cols)}, but the "
                f"model has {kind or type(module).__name__} of shape {shape}: the module list does not match."
            )
        replace_module(model, spec.name, _roast_layer_like(module, kind, store, spec, copy_values=False))
    model.add_module(STORE_NAME, store)
    return store


def _dense_layer_like(layer: RoastLinear | RoastEmbedding) -> nn.Module:
    """The plain module ``layer`` stands for, with the weight it computes with and its owned tensors."""
    from transformers.pytorch_utils import Conv1D

    w = layer.materialize_weight()  # an embedding's padding row is written into it
    owned = layer.owned_tensors()
    if isinstance(layer, RoastEmbedding):
        dense = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx, device=w.device)
    elif layer.spec.kind == "conv1d":
        dense = Conv1D(layer.out_features, layer.in_features)
    else:
        dense = nn.Linear(layer.in_features, layer.out_features, bias="bias" in owned, device="meta")
    dense.weight = nn.Parameter(w)
    if "bias" in owned:
        dense.bias = nn.Parameter(owned["bias"].detach().clone())
    dense.train(layer.training)
    return dense


@torch.no_grad()
def merge_model(model: nn.Module) -> nn.Module:
    """ROAST -> dense in place: every compressed layer becomes the plain module it stands for, with equal
    outputs, and the store is removed. Returns ``model``."""
    for name, layer in roast_layers(model):
        replace_module(model, name, _dense_layer_like(layer))
    delattr(model, STORE_NAME)
    return model
