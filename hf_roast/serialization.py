"""Saving and loading compressed checkpoints: one format, one loading path.

A checkpoint folder holds:

* ``config.json``: the model's config with ``architectures`` set and ``quantization_config``
  (``quant_method: "roast"`` + the whole ROAST config and plan), which is what lets
  ``AutoModel*.from_pretrained`` load it after ``import hf_roast`` (see :mod:`hf_roast.quantizer`);
* ``roast_config.json``: the same ROAST config and plan (with ``format_version``), for tools that read
  it without transformers;
* ``model.safetensors``: z once, the uncompressed parameters, and one empty ``<module>.weight``
  marker per compressed module so that a dense load fails loudly; no dense copy of a compressed weight;
* ``README.md``: the model card (:mod:`hf_roast.model_card`).

:func:`load_roast_model` (``RoastModel.from_pretrained``) goes through the very same transformers
quantizer path as the Auto classes, after checks that give clear errors for damaged folders.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os

from safetensors import SafetensorError, safe_open

from .config import CONFIG_NAME, RoastConfig
from .layers import STORE_NAME
from .mapping import MAPPING_VERSION, MappingPlan
from .model import FORMAT_VERSION

HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")


# ---- saving ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _saving_as_roast(base, quantization_config):
    """Attach the ROAST quantizer and config for the duration of one ``save_pretrained`` only.

    Leaving ``quantization_config`` on the live config would make a model densified later by
    ``merge_and_unload`` save itself as a ROAST checkpoint.
    """
    from .quantizer import RoastHfQuantizer

    sentinel = object()
    old_quantizer = base.__dict__.get("hf_quantizer", sentinel)
    old_qc = base.config.__dict__.get("quantization_config", sentinel)
    base.hf_quantizer = RoastHfQuantizer(quantization_config, pre_quantized=True)
    base.config.quantization_config = quantization_config
    try:
        yield
    finally:
        if old_quantizer is sentinel:
            base.__dict__.pop("hf_quantizer", None)
        else:
            base.hf_quantizer = old_quantizer
        if old_qc is sentinel:
            base.config.__dict__.pop("quantization_config", None)
        else:
            base.config.quantization_config = old_qc


def save_roast_model(
    roast_model,
    save_directory: str | os.PathLike,
    model_card: bool = True,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    **kwargs,
) -> list[str]:
    """Write the checkpoint; returns the file names written (relative to ``save_directory``).

    ``base_model``, ``license`` and ``repo_id`` (the name in the loading snippet) only go to the card.
    """
    from .quantizer import RoastQuantizationConfig

    if kwargs.pop("push_to_hub", False):
        raise ValueError(
            "Use RoastModel.push_to_hub(repo_id) to upload; save_pretrained only writes a folder."
        )
    if not kwargs.pop("safe_serialization", True):
        raise ValueError("hf_roast checkpoints are safetensors only; drop safe_serialization=False.")
    os.makedirs(save_directory, exist_ok=True)
    base = roast_model.base_model
    roast_dict = roast_model.roast_config_dict()
    quantization_config = RoastQuantizationConfig(**roast_dict)
    with _saving_as_roast(base, quantization_config):
        base.save_pretrained(save_directory, **kwargs)
    with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
        json.dump(roast_dict, f, indent=2, sort_keys=True)
    if model_card:
        from .model_card import write_model_card

        write_model_card(roast_model, save_directory, repo_id=repo_id, base_model=base_model, license=license)
    return sorted(
        os.path.relpath(p, save_directory)
        for p in glob.glob(os.path.join(save_directory, "**", "*"), recursive=True)
        if os.path.isfile(p)
    )


# ---- reading and checking -------------------------------------------------------------------------
def _weight_files(directory: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{directory} holds no .safetensors file: the checkpoint is incomplete.")
    return files


def _open_error(path: str, e: Exception) -> ValueError:
    return ValueError(
        f"Cannot read {path}: the file is truncated or corrupt ({e}). Download or save the checkpoint again."
    )


def tensor_shapes(directory: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers, reading no tensor data.

    Opening validates the header against the file size, so a truncated file fails here, with a clear
    message, rather than deep inside transformers.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for path in _weight_files(directory):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError, RuntimeError) as e:
            raise _open_error(path, e) from e
    return shapes


def read_roast_dict(directory: str | os.PathLike) -> tuple[dict, str]:
    """The stored ROAST config: ``roast_config.json``, else ``config.json``'s ``quantization_config``."""
    path = os.path.join(directory, CONFIG_NAME)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f), path
    hf_path = os.path.join(directory, "config.json")
    if os.path.isfile(hf_path):
        with open(hf_path) as f:
            qc = json.load(f).get("quantization_config") or {}
        if qc.get("quant_method") == "roast":
            return {k: v for k, v in qc.items() if k != "quant_method"}, hf_path
    raise FileNotFoundError(
        f"{directory} has neither {CONFIG_NAME} nor a config.json with quant_method 'roast': it is not an hf_roast "
        "checkpoint. Compress a dense model with get_roast_model or `hf-roast compress` first."
    )


def parse_roast_config(raw: dict, source: str) -> tuple[RoastConfig, MappingPlan]:
    """RoastConfig and plan from a stored dict, checking the mapping and format versions first."""
    version = raw.get("mapping_version", raw.get("plan", {}).get("mapping_version"))
    if version != MAPPING_VERSION:
        raise ValueError(
            f"{source} was written with ROAST mapping version {version}, but this hf_roast implements version "
            f"{MAPPING_VERSION}; the weights would be read from the wrong slots. Install the hf_roast release "
            "that wrote it."
        )
    fmt = raw.get("format_version", FORMAT_VERSION)
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        raise ValueError(
            f"{source} has checkpoint format_version {fmt}, newer than this hf_roast reads ({FORMAT_VERSION}): "
            "upgrade hf_roast."
        )
    if "plan" not in raw:
        raise ValueError(f"{source} has no module plan: it is not a complete hf_roast checkpoint.")
    config = RoastConfig.from_dict(raw)
    plan = MappingPlan.from_dict(raw["plan"])
    if plan.mapping_version != MAPPING_VERSION:
        raise ValueError(f"{source}: the plan's mapping version {plan.mapping_version} != {MAPPING_VERSION}.")
    if plan.mapper != config.mapper or tuple(plan.tile) != tuple(config.tile) or plan.seed != config.seed:
        raise ValueError(
            f"{source}: the plan disagrees with the config on mapper, tile or seed; the file was edited."
        )
    return config, plan


# ---- loading --------------------------------------------------------------------------------------
def load_roast_model(path: str | os.PathLike, **kwargs):
    """Load through transformers' quantizer path (the one ``AutoModel*`` takes), with upfront checks.

    ``revision``, ``token``, ``cache_dir``, ``local_files_only`` and ``force_download`` go to the Hub
    download; the other keyword arguments (``dtype``, ``device_map``...) to ``from_pretrained``.
    """
    import transformers

    from .model import RoastModel
    from .quantizer import MARKER_SUFFIX

    hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    directory = resolve_checkpoint(path, **hub_kwargs)
    raw, source = read_roast_dict(directory)
    config, plan = parse_roast_config(raw, source)
    shapes = tensor_shapes(directory)
    z_shape = shapes.get(f"{STORE_NAME}.z")
    if z_shape != (plan.num_slots,):
        raise ValueError(
            f"{directory}: {STORE_NAME}.z has shape {z_shape}, the plan needs ({plan.num_slots},)."
        )

    hf_config = transformers.AutoConfig.from_pretrained(directory)
    hf_config.quantization_config = {"quant_method": "roast", **raw}
    archs = getattr(hf_config, "architectures", None) or []
    model_cls = getattr(transformers, archs[0], None) if archs else None
    if model_cls is None:
        raise ValueError(
            f"{directory}/config.json names no known architecture ({archs}); set `architectures`."
        )
    model, info = model_cls.from_pretrained(directory, config=hf_config, output_loading_info=True, **kwargs)
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.endswith(MARKER_SUFFIX))
    if unexpected:
        raise ValueError(f"{directory}: unexpected tensors {unexpected[:8]}: the module list does not match.")
    if info["missing_keys"]:
        raise ValueError(
            f"{directory}: the checkpoint lacks tensors {sorted(info['missing_keys'])[:8]}: it is incomplete."
        )
    _drop_quantizer(model)
    return RoastModel(model, config)


def _drop_quantizer(model) -> None:
    """Make the loaded model look like ``get_roast_model``'s output: a plain HF model plus the store.

    RoastModel re-attaches the quantizer only while saving, so ``merge_and_unload`` then ``save_pretrained``
    writes a dense checkpoint, never one that claims ``quant_method: "roast"``.
    """
    from transformers import PreTrainedModel

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config.__dict__.pop("_is_quantized", None)
            module.config.__dict__.pop("quantization_config", None)


def resolve_checkpoint(path: str | os.PathLike, **kwargs) -> str:
    """A local folder for ``path``: the folder itself, or a Hub snapshot (see :mod:`hf_roast.hub`)."""
    if os.path.isdir(path):
        return str(path)
    from .hub import download_checkpoint

    return download_checkpoint(str(path), **kwargs)
