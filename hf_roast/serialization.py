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
import re
import warnings

from safetensors import SafetensorError, safe_open

from .atomic import atomic_directory
from .config import CONFIG_NAME, RoastConfig
from .layers import STORE_NAME
from .mapping import MAPPING_VERSION, MappingPlan, plan_digest
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
    """Write the checkpoint atomically (see :mod:`hf_roast.atomic`); returns the file names written
    (relative to ``save_directory``).

    ``base_model``, ``license`` and ``repo_id`` (the name in the loading snippet) only go to the card.
    """
    from .quantizer import RoastQuantizationConfig

    if kwargs.pop("push_to_hub", False):
        raise ValueError(
            "Use RoastModel.push_to_hub(repo_id) to upload; save_pretrained only writes a folder."
        )
    if not kwargs.pop("safe_serialization", True):
        raise ValueError("hf_roast checkpoints are safetensors only; drop safe_serialization=False.")
    if not kwargs.get("is_main_process", True):
        return []  # as transformers: in a distributed run only the main process writes
    base = roast_model.base_model
    roast_dict = roast_model.roast_config_dict()
    quantization_config = RoastQuantizationConfig(**roast_dict)
    with atomic_directory(save_directory) as staging:
        with _saving_as_roast(base, quantization_config):
            # the class's method: a model loaded by AutoModel* carries an instance-level save_pretrained
            # (see hf_roast.quantizer) that would come back here
            type(base).save_pretrained(base, staging, **kwargs)
        with open(os.path.join(staging, CONFIG_NAME), "w") as f:
            json.dump(roast_dict, f, indent=2, sort_keys=True)
        if model_card:
            from .model_card import write_model_card

            write_model_card(roast_model, staging, repo_id=repo_id, base_model=base_model, license=license)
        written = sorted(
            os.path.relpath(p, staging)
            for p in glob.glob(os.path.join(staging, "**", "*"), recursive=True)
            if os.path.isfile(p)
        )
    return written


# ---- reading and checking -------------------------------------------------------------------------
PICKLE_FILES = re.compile(r".*\.(bin|pt|pth|pkl|pickle|ckpt)")
TRAINER_STATE_FILES = re.compile(r"(optimizer|scheduler|scaler)\.pt|rng_state(_\d+)?\.pth|training_args\.bin")
"""What a Trainer checkpoint folder holds beside the model: never read by hf_roast, so never warned about."""


def check_no_pickle(directory: str) -> None:
    """Refuse a folder whose weights exist only as pickle files; warn that pickles beside safetensors are
    ignored. Unpickling can execute code, so hf_roast reads safetensors and JSON only."""
    names = sorted(os.listdir(directory))
    pickles = [n for n in names if PICKLE_FILES.fullmatch(n) and not TRAINER_STATE_FILES.fullmatch(n)]
    if not pickles:
        return
    if not any(n.endswith(".safetensors") for n in names):
        raise ValueError(
            f"{directory} holds weights only as pickle files {pickles[:4]}: hf_roast reads safetensors and JSON "
            "only, because loading a pickle can execute code from the file. Ask for (or write, from a model you "
            "trust) a safetensors checkpoint: RoastModel.save_pretrained writes one."
        )
    warnings.warn(
        f"Ignoring {pickles[:4]} in {directory}: hf_roast reads the safetensors weights only (a pickle can "
        "execute code when loaded).",
        stacklevel=3,
    )


def _weight_files(directory: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{directory} holds no .safetensors file: the checkpoint is incomplete.")
    return files


def _open_error(path: str, e: Exception) -> ValueError:
    return ValueError(
        f"Cannot read {path}: the file is truncated or corrupt ({e}). Download or save the checkpoint again."
    )


def tensor_headers(directory: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's (shape, safetensors dtype such as ``"F32"``) from the headers, reading no data.

    Opening validates the header against the file size, so a truncated file fails here, with a clear
    message, rather than deep inside transformers.
    """
    headers: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in _weight_files(directory):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    headers[key] = (tuple(piece.get_shape()), piece.get_dtype())
        except (SafetensorError, OSError, RuntimeError) as e:
            raise _open_error(path, e) from e
    return headers


SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


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


def format_version(raw: dict, source: str) -> tuple[int, int]:
    """The stored ``format_version`` as (major, minor); 1.0 was written as the integer 1."""
    value = raw.get("format_version", 1)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value, 0
    if isinstance(value, str) and re.fullmatch(r"[1-9]\d*\.\d+", value):
        major, minor = value.split(".")
        return int(major), int(minor)
    raise ValueError(
        f"{source}: format_version {value!r} is not a version such as '1.1'; the file is damaged."
    )


def parse_roast_config(raw: dict, source: str) -> tuple[RoastConfig, MappingPlan]:
    """RoastConfig and plan from a stored dict, checking the versions, the plan's digest and consistency.

    Every refusal is a ValueError that names the offending field.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: a ROAST config is a JSON object, got {type(raw).__name__}.")
    plan_raw = raw.get("plan")
    version = raw.get(
        "mapping_version", plan_raw.get("mapping_version") if isinstance(plan_raw, dict) else None
    )
    if version != MAPPING_VERSION or isinstance(version, bool):
        raise ValueError(
            f"{source}: mapping_version={version!r}: it was written with ROAST mapping version {version}, but "
            f"this hf_roast implements version "
            f"{MAPPING_VERSION}; the weights would be read from the wrong slots. Install the hf_roast release "
            "that wrote it."
        )
    fmt = format_version(raw, source)
    ours = tuple(int(p) for p in FORMAT_VERSION.split("."))
    if fmt[0] > ours[0]:
        raise ValueError(
            f"{source} has checkpoint format_version {fmt[0]}.{fmt[1]}, a newer major version than this hf_roast "
            f"reads ({FORMAT_VERSION}): upgrade hf_roast."
        )
    if not isinstance(plan_raw, dict):
        raise ValueError(f"{source} has no module plan: it is not a complete hf_roast checkpoint.")
    if "plan_sha256" in raw or fmt >= (1, 1):
        if raw.get("plan_sha256") != plan_digest(plan_raw):
            raise ValueError(
                f"{source}: the plan does not match its plan_sha256 digest: the file was edited or damaged "
                "(a changed plan would read other weights). Download or save the checkpoint again."
            )
    config = RoastConfig.from_dict(raw)
    try:
        plan = MappingPlan.from_dict(plan_raw)
        plan.check()
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise ValueError(f"{source}: the plan is malformed ({e}).") from e
    if plan.mapping_version != MAPPING_VERSION:
        raise ValueError(f"{source}: the plan's mapping version {plan.mapping_version} != {MAPPING_VERSION}.")
    mismatched = [
        name
        for name in ("mapper", "sign", "seed", "tile")
        if _as_tuple(getattr(plan, name)) != _as_tuple(getattr(config, name))
    ]
    if mismatched:
        raise ValueError(
            f"{source}: the plan disagrees with the config on {', '.join(mismatched)}; the file was edited."
        )
    return config, plan


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


# ---- loading --------------------------------------------------------------------------------------
def load_roast_model(path: str | os.PathLike, **kwargs):
    """Load through transformers' quantizer path (the one ``AutoModel*`` takes), with upfront checks.

    ``revision``, ``token``, ``cache_dir``, ``local_files_only`` and ``force_download`` go to the Hub
    download; the other keyword arguments (``dtype``, ``device_map``...) to ``from_pretrained``.
    """
    import transformers

    from .model import RoastModel
    from .quantizer import MARKER_SUFFIX

    if kwargs.pop("trust_remote_code", False):
        warnings.warn(
            "trust_remote_code is ignored: an hf_roast checkpoint runs no code from its folder (only "
            "safetensors and JSON are read) and loads transformers' own architectures only.",
            stacklevel=3,
        )
    hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    directory = resolve_checkpoint(path, **hub_kwargs)
    check_no_pickle(directory)
    raw, source = read_roast_dict(directory)
    config, plan = parse_roast_config(raw, source)
    headers = tensor_headers(directory)
    z_shape, z_dtype = headers.get(f"{STORE_NAME}.z", (None, None))
    if z_shape != (plan.num_slots,):
        raise ValueError(
            f"{directory}: {STORE_NAME}.z has shape {z_shape}, the plan needs ({plan.num_slots},)."
        )
    if z_dtype != SAFETENSORS_DTYPES[config.dtype]:
        raise ValueError(
            f"{directory}: {STORE_NAME}.z is stored as {z_dtype} but {source} says dtype={config.dtype!r}: the "
            "config was edited. Save the checkpoint again."
        )

    hf_config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False)
    hf_config.quantization_config = {"quant_method": "roast", **raw}
    archs = getattr(hf_config, "architectures", None) or []
    model_cls = getattr(transformers, archs[0], None) if archs else None
    if model_cls is None:
        raise ValueError(
            f"{directory}/config.json names no known architecture ({archs}); set `architectures`."
        )
    model, info = model_cls.from_pretrained(
        directory, config=hf_config, output_loading_info=True, use_safetensors=True, **kwargs
    )
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
    model.__dict__.pop("save_pretrained", None)  # RoastModel.save_pretrained writes the roast files itself
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
