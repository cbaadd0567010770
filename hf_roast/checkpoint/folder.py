"""Writing and reading checkpoint folders: one format (:mod:`hf_roast.checkpoint_format`), one loading path.

A checkpoint folder holds:

* ``config.json``: the model's config with ``architectures`` set and ``quantization_config``
  (``quant_method: "roast"`` + the whole ROAST config and plan), which is what lets
  ``AutoModel*.from_pretrained`` load it after ``import hf_roast`` (see :mod:`hf_roast.quantizer`);
* ``roast_config.json``: the same ROAST config and plan (with ``format_version``), for tools that read
  it without transformers;
* ``model.safetensors``: z once, the uncompressed parameters, and one empty ``<module>.weight``
  marker per compressed module so that a dense load fails loudly; no dense copy of a compressed weight;
* ``README.md``: the model card (:mod:`hf_roast.checkpoint.card`).

:func:`load_checkpoint` (behind ``RoastModel.from_pretrained``) goes through the very same transformers
quantizer path as the Auto classes, after checks that give clear errors for damaged folders, and returns
the plain HF model with its RoastConfig. This module is also the one place that attaches transformers'
quantization state to a model (only while saving) and drops it (after loading, and when densifying).
It never imports the quantizer: the writer is handed the quantizer to attach.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import warnings

from ..atomic import atomic_directory
from ..checkpoint_format import (
    CONFIG_NAME,
    MARKER_SUFFIX,
    QUANT_METHOD,
    RECOVERY_KEY,
    check_no_pickle,
    parse_roast_config,
    read_roast_dict,
    tensor_headers,
    z_tensor_headers,
)
from . import card as cards
from .hub import download_checkpoint

HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")


# ---- transformers' quantization state ----------------------------------------------------------------
@contextlib.contextmanager
def quantization_attached(base, hf_quantizer):
    """Attach ``hf_quantizer`` and its config to ``base`` for the duration of one ``save_pretrained`` only.

    Leaving ``quantization_config`` on the live config would make a model densified later by
    ``merge_and_unload`` save itself as a ROAST checkpoint.
    """
    sentinel = object()
    old_quantizer = base.__dict__.get("hf_quantizer", sentinel)
    old_qc = base.config.__dict__.get("quantization_config", sentinel)
    base.hf_quantizer = hf_quantizer
    base.config.quantization_config = hf_quantizer.quantization_config
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


def drop_quantization_state(model) -> None:
    """Drop every trace of transformers' quantization state (and of ROAST's save hook) from ``model``.

    After loading, this makes the model look like ``get_roast_model``'s output: a plain HF model plus the
    store (RoastModel re-attaches the quantizer only while saving, so ``merge_and_unload`` then
    ``save_pretrained`` writes a dense checkpoint, never one that claims ``quant_method: "roast"``).
    After ``merge_and_unload`` it makes the dense model save and reload as a plain one.
    """
    from transformers import PreTrainedModel

    # save_pretrained: the instance-level hook of hf_roast.quantizer (RoastModel writes the roast files itself)
    for attr in ("roast_config", "save_pretrained", "is_quantized", "quantization_method"):
        model.__dict__.pop(attr, None)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.__dict__.pop("hf_quantizer", None)
    config = getattr(model, "config", None)
    if config is not None:
        config.__dict__.pop("quantization_config", None)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config.__dict__.pop("_is_quantized", None)
            module.config.__dict__.pop("quantization_config", None)


# ---- saving ---------------------------------------------------------------------------------------
def write_checkpoint(
    base,
    roast_dict: dict,
    hf_quantizer,
    save_directory: str | os.PathLike,
    model_card: bool = True,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    recovery: dict | None = None,
    **kwargs,
) -> list[str]:
    """Write the checkpoint of the compressed HF model ``base`` atomically (see :mod:`hf_roast.atomic`);
    returns the file names written (relative to ``save_directory``).

    ``roast_dict`` is ``roast_config.json``'s content and ``hf_quantizer`` the quantizer whose config
    carries it (:func:`hf_roast.quantizer.save_roast_model` builds both). ``base_model``, ``license`` and
    ``repo_id`` (the name in the loading snippet) only go to the card. ``recovery`` (the record of a recovery
    run, :meth:`hf_roast.recovery.RecoveryReport.to_dict`) goes to ``roast_config.json`` and the card, not to
    ``config.json``: it is provenance, and transformers has no use for it.
    """
    if kwargs.pop("push_to_hub", False):
        raise ValueError(
            "Use RoastModel.push_to_hub(repo_id) to upload; save_pretrained only writes a folder."
        )
    if not kwargs.pop("safe_serialization", True):
        raise ValueError("hf_roast checkpoints are safetensors only; drop safe_serialization=False.")
    if not kwargs.get("is_main_process", True):
        return []  # as transformers: in a distributed run only the main process writes
    with atomic_directory(save_directory) as staging:
        with quantization_attached(base, hf_quantizer):
            # the class's method: a model loaded by AutoModel* carries an instance-level save_pretrained
            # (see hf_roast.quantizer) that would come back here
            type(base).save_pretrained(base, staging, **kwargs)
        if recovery is not None:
            roast_dict = {**roast_dict, RECOVERY_KEY: recovery}
        with open(os.path.join(staging, CONFIG_NAME), "w") as f:
            json.dump(roast_dict, f, indent=2, sort_keys=True)
        if model_card:
            cards.write_model_card(
                base, staging, repo_id=repo_id, base_model=base_model, license=license, recovery=recovery
            )
        written = sorted(
            os.path.relpath(p, staging)
            for p in glob.glob(os.path.join(staging, "**", "*"), recursive=True)
            if os.path.isfile(p)
        )
    return written


# ---- loading --------------------------------------------------------------------------------------
def model_class_for(architectures) -> type | None:
    """The transformers class named by ``config.json``'s ``architectures`` (its first entry), or None."""
    import transformers

    archs = architectures or []
    return getattr(transformers, archs[0], None) if archs else None


def load_checkpoint(path: str | os.PathLike, **kwargs) -> tuple:
    """Load through transformers' quantizer path (the one ``AutoModel*`` takes), with upfront checks.

    Returns the HF model (a plain one plus the store, its quantization state dropped) and its RoastConfig;
    ``RoastModel.from_pretrained`` wraps them. ``revision``, ``token``, ``cache_dir``, ``local_files_only``
    and ``force_download`` go to the Hub download; the other keyword arguments (``dtype``,
    ``device_map``...) to ``from_pretrained``.
    """
    import transformers

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
    for key, (shape, dtype) in z_tensor_headers(config, plan).items():
        stored_shape, stored_dtype = headers.get(key, (None, None))
        if stored_shape != shape:
            raise ValueError(
                f"{directory}: {key} has shape {stored_shape}, but {source} (z_bits={config.z_bits}, "
                f"z_group_size={config.z_group_size}, z_qat={config.z_qat}) and the plan need {shape}: the config "
                "was edited or the file is incomplete. Save the checkpoint again."
            )
        if stored_dtype != dtype:
            raise ValueError(
                f"{directory}: {key} is stored as {stored_dtype} but {source} says dtype={config.dtype!r}, "
                f"z_bits={config.z_bits} ({dtype}): the config was edited. Save the checkpoint again."
            )

    hf_config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False)
    hf_config.quantization_config = {"quant_method": QUANT_METHOD, **raw}
    archs = getattr(hf_config, "architectures", None) or []
    model_cls = model_class_for(archs)
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
    drop_quantization_state(model)
    return model, config


def resolve_checkpoint(path: str | os.PathLike, **kwargs) -> str:
    """A local folder for ``path``: the folder itself, or a Hub snapshot (see :mod:`hf_roast.checkpoint.hub`)."""
    if os.path.isdir(path):
        return str(path)
    return download_checkpoint(str(path), **kwargs)
