"""Saving and loading compressed checkpoints.

A checkpoint folder holds the model's ``config.json`` (``architectures`` set), ``roast_config.json``
(every RoastConfig field, the plan: module list, shapes, scales, mapping version) and
``model.safetensors`` with z once and the uncompressed parameters; no dense copy of a compressed weight.
"""

from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import SafetensorError, safe_open

from .compress import apply_plan
from .config import CONFIG_NAME, RoastConfig
from .mapping import MAPPING_VERSION, MappingPlan


def save_roast_model(roast_model, save_directory: str | os.PathLike, **kwargs) -> None:
    os.makedirs(save_directory, exist_ok=True)
    base = roast_model.base_model
    if getattr(base.config, "architectures", None) is None:
        base.config.architectures = [type(base).__name__]
    kwargs.setdefault("safe_serialization", True)
    if not kwargs["safe_serialization"]:
        raise ValueError("hf_roast checkpoints are safetensors only; drop safe_serialization=False.")
    kwargs.pop("safe_serialization")
    base.save_pretrained(save_directory, **kwargs)
    with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
        json.dump(roast_model.roast_config_dict(), f, indent=2, sort_keys=True)


def _weight_files(directory: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{directory} holds no .safetensors file: the checkpoint is incomplete.")
    return files


def read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, with a clear error on a damaged file."""
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(
                f"Cannot read {path}: the file is truncated or corrupt ({e}). Download or save the checkpoint again."
            ) from e
    return state


def parse_roast_config(raw: dict, source: str) -> tuple[RoastConfig, MappingPlan]:
    """RoastConfig and plan from a stored dict, checking the mapping version first."""
    version = raw.get("mapping_version", raw.get("plan", {}).get("mapping_version"))
    if version != MAPPING_VERSION:
        raise ValueError(
            f"{source} was written with ROAST mapping version {version}, but this hf_roast implements version "
            f"{MAPPING_VERSION}; the weights would be read from the wrong slots. Install the hf_roast release "
            "that wrote it."
        )
    if "plan" not in raw:
        raise ValueError(f"{source} has no module plan: it is not a complete hf_roast checkpoint.")
    config = RoastConfig.from_dict(raw)
    plan = MappingPlan.from_dict(raw["plan"])
    if plan.mapping_version != MAPPING_VERSION:
        raise ValueError(f"{source}: the plan's mapping version {plan.mapping_version} != {MAPPING_VERSION}.")
    if plan.mapper != config.mapper or tuple(plan.tile) != tuple(config.tile) or plan.seed != config.seed:
        raise ValueError(f"{source}: the plan disagrees with the config on mapper, tile or seed; the file was edited.")
    return config, plan


def load_roast_model(path: str | os.PathLike, **kwargs):
    """Build the architecture with meta weights, swap in Roast layers, assign the stored tensors."""
    import transformers
    from accelerate import init_empty_weights

    from .model import RoastModel, read_roast_config

    directory = resolve_checkpoint(path, **kwargs)
    config, plan = parse_roast_config(read_roast_config(directory), os.path.join(directory, CONFIG_NAME))
    hf_config = transformers.AutoConfig.from_pretrained(directory)
    if getattr(hf_config, "quantization_config", None) is not None:
        del hf_config.quantization_config
    archs = getattr(hf_config, "architectures", None) or []
    model_cls = getattr(transformers, archs[0], None) if archs else None
    if model_cls is None:
        raise ValueError(f"{directory}/config.json names no known architecture ({archs}); set `architectures`.")
    with init_empty_weights(include_buffers=False):
        model = model_cls._from_config(hf_config)
    store = apply_plan(model, config, plan)
    state = read_state_dict(directory)
    z = state.get("roast_store.z")
    if z is None or z.shape != (plan.num_slots,):
        got = None if z is None else tuple(z.shape)
        raise ValueError(f"{directory}: roast_store.z has shape {got}, the plan needs ({plan.num_slots},).")
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"{directory}: unexpected tensors {result.unexpected_keys[:8]}: the module list does not match.")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    still_meta += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if still_meta:
        raise ValueError(f"{directory}: the checkpoint lacks tensors {still_meta[:8]}: it is incomplete.")
    store.rebuild()
    model.eval()
    return RoastModel(model, config)


def resolve_checkpoint(path: str | os.PathLike, **kwargs) -> str:
    """A local folder for ``path``: the folder itself, or a Hub snapshot (see :mod:`hf_roast.hub`)."""
    if os.path.isdir(path):
        return str(path)
    from .hub import download_checkpoint

    return download_checkpoint(str(path), **kwargs)
