"""transformers-native loading: a ``"roast"`` quantization method for ``AutoModel*.from_pretrained``.

A ROAST checkpoint's ``config.json`` carries ``quantization_config = {"quant_method": "roast", ...}``
with the whole RoastConfig and its plan (mapping version, module list, shapes, scales). After
``import hf_roast`` transformers finds :class:`RoastQuantizationConfig` and :class:`RoastHfQuantizer`
for it, and the quantizer swaps the plan's modules into the meta-device skeleton *before* any weight
is read, so no dense target weight is ever allocated; the loader then fills ``roast_store.z``.

Why the key layout carries markers: without ``import hf_roast`` transformers does not fail on an
unknown ``quant_method``; it logs "Unknown quantization type", skips it and would return a dense model
whose compressed weights are random. Every checkpoint therefore stores, for each compressed module,
an empty ``<module>.weight`` tensor (shape ``(0,)``). A dense model cannot load it: transformers
raises a size-mismatch ``RuntimeError`` (unless the user passes ``ignore_mismatched_sizes=True``).
With hf_roast the markers are not parameters of the Roast layers and are ignored on purpose.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint.folder import write_checkpoint
from .checkpoint_format import MARKER_SUFFIX, QUANT_METHOD, STORE_NAME, parse_roast_config, roast_config_dict
from .compress import apply_plan
from .config import RoastConfig
from .layers import RoastStore, roast_layers


def marker_state_dict(plan) -> dict[str, torch.Tensor]:
    """One empty ``<module>.weight`` per compressed module: makes a dense load fail loudly."""
    return {spec.name + MARKER_SUFFIX: torch.zeros(0, dtype=torch.float32) for spec in plan.modules}


def _marker_pattern(module_names: list[str]) -> str:
    names = "|".join(re.escape(name) for name in sorted(set(module_names)))
    return rf"(^|\.)({names}){re.escape(MARKER_SUFFIX)}$"


class RoastQuantizationConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` for ROAST: ``quant_method="roast"`` plus every field of
    ``roast_config.json`` (the RoastConfig fields, ``format_version``, ``scaler`` and the ``plan``).

    transformers builds it with ``cls(**stored_dict)``, so ``__init__`` accepts every stored key. The
    mapping version is checked here, so a checkpoint written with other mapping formulas fails to load
    before any module is built.
    """

    def __init__(self, quant_method: str = QUANT_METHOD, **roast_fields: Any):
        if quant_method != QUANT_METHOD:
            raise ValueError(
                f"RoastQuantizationConfig needs quant_method={QUANT_METHOD!r}, got {quant_method!r}."
            )
        self.quant_method = QUANT_METHOD
        self._fields = copy.deepcopy(roast_fields)
        # Raises on a wrong mapping version / missing plan; cached because every hook needs them.
        self._roast_config, self._plan = parse_roast_config(
            self._fields, "quantization_config (quant_method='roast')"
        )

    @property
    def roast_config(self):
        return self._roast_config

    @property
    def plan(self):
        return self._plan

    def set_plan(self, plan) -> None:
        """Adopt ``plan`` (the same mapping under other module names); saving then writes it."""
        self._plan = plan
        self._fields["plan"] = plan.to_dict()
        if "plan_sha256" in self._fields:
            self._fields["plan_sha256"] = plan.digest()

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, **copy.deepcopy(self._fields)}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def __getattr__(self, name: str):
        # transformers probes optional attributes (``dequantize``, ``modules_to_not_convert``...) with
        # getattr(..., default); stored fields are readable as attributes too.
        fields = self.__dict__.get("_fields")
        if fields is not None and name in fields:
            return fields[name]
        raise AttributeError(name)

    def update(self, **kwargs):
        return kwargs  # nothing in a ROAST checkpoint is a loading-time option


class RoastHfQuantizer(HfQuantizer):
    """Loads pre-compressed ROAST checkpoints; trainable (z is an ordinary fp parameter) and serialisable."""

    requires_calibration = False

    def __init__(self, quantization_config: RoastQuantizationConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            raise ValueError(
                "hf_roast cannot compress while transformers loads a dense checkpoint. Load the dense model, then "
                "call hf_roast.get_roast_model(model, RoastConfig(...)), or run `hf-roast compress MODEL_DIR OUT_DIR`."
            )

    # ---- loading --------------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, **kwargs):
        qc = self.quantization_config
        stored_names = [spec.name for spec in qc.plan.modules]
        qc.set_plan(_plan_for(model, qc.plan))
        apply_plan(model, qc.roast_config, qc.plan, device="meta")
        # Every layer reads z directly (no accelerate hook ever runs on the store), so z must not be offloaded:
        # as the first child, device_map="auto" places the store before any layer, on the main device.
        model._modules = {STORE_NAME: model._modules.pop(STORE_NAME), **model._modules}
        ignore = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
        marker = _marker_pattern(stored_names + [spec.name for spec in qc.plan.modules])
        # transformers >= 5.10 keeps a set here; older 5.x releases concatenate it with a list
        model._keys_to_ignore_on_load_unexpected = (
            ignore | {marker} if isinstance(ignore, set) else [*(ignore or []), marker]
        )
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        store: RoastStore = getattr(model, STORE_NAME)
        _check_loaded(model, store, getattr(model, "hf_device_map", None))
        store.rebuild()  # the gradient scaler and layer tables need the loaded z's device
        # transformers' own save_pretrained would write config.json and the weights but neither
        # roast_config.json nor the card: route this model's saves through hf_roast's writer
        model.save_pretrained = types.MethodType(_save_as_roast_checkpoint, model)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    # ---- saving ---------------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model):
        """The model's state dict plus the markers (see the module docstring)."""
        store = getattr(model, STORE_NAME, None)
        if store is None:
            raise ValueError(
                "This model carries a ROAST quantization_config but no longer has a roast_store (was it densified "
                "with merge_and_unload?). Remove `model.hf_quantizer` and `model.config.quantization_config` "
                "before saving it as a dense model."
            )
        state = model.state_dict()
        state.update(marker_state_dict(store.plan))
        # No extra safetensors metadata: safetensors writes a map of several keys in random order, and
        # byte-identical files for identical models are worth more (the version is in config.json).
        return state, {}

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def save_roast_model(model, config: RoastConfig, save_directory: str | os.PathLike, **kwargs) -> list[str]:
    """Write the whole hf_roast checkpoint of the compressed HF ``model`` (see
    :func:`hf_roast.checkpoint.folder.write_checkpoint`, which gets the keyword arguments); returns the file names.

    The one save: ``RoastModel.save_pretrained`` and the ``save_pretrained`` of a model loaded by
    ``AutoModel*`` both come here. The quantizer is attached only while transformers writes.
    """
    store = getattr(model, STORE_NAME)
    roast_dict = roast_config_dict(config, store.plan, store.scaler)
    hf_quantizer = RoastHfQuantizer(RoastQuantizationConfig(**roast_dict), pre_quantized=True)
    return write_checkpoint(model, roast_dict, hf_quantizer, save_directory, **kwargs)


def _save_as_roast_checkpoint(model, save_directory, **kwargs):
    """``save_pretrained`` of a model loaded by ``AutoModel*``: the whole hf_roast checkpoint, atomically."""
    return save_roast_model(
        model, model.hf_quantizer.quantization_config.roast_config, save_directory, **kwargs
    )


def _has_module(model, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _plan_for(model, plan):
    """The plan with module names as ``model`` spells them.

    A checkpoint saved from ``LlamaForCausalLM`` names ``model.layers.0...``; ``AutoModel`` builds a
    ``LlamaModel`` that names it ``layers.0...`` (and the other way round). Names do not enter the mapping
    (it depends on the module order and shapes only), so the prefix can be adjusted safely. Anything else
    is left for ``apply_plan`` to refuse with a clear module-list error.
    """
    names = [spec.name for spec in plan.modules]
    if all(_has_module(model, n) for n in names):
        return plan
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix:
        return plan
    for rename in (lambda n: n.removeprefix(prefix + "."), lambda n: f"{prefix}.{n}"):
        renamed = [rename(n) for n in names]
        if renamed != names and all(_has_module(model, n) for n in renamed):
            modules = [dataclasses.replace(spec, name=n) for spec, n in zip(plan.modules, renamed)]
            return dataclasses.replace(plan, modules=modules)
    return plan


def _offloaded(name: str, device_map: dict | None) -> bool:
    """Whether ``device_map`` offloads the module holding tensor ``name`` (to "cpu" or "disk"): accelerate
    then leaves the tensor on the meta device and its hooks load it when the module runs."""
    if not device_map:
        return False
    owners = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return bool(owners) and device_map[max(owners, key=len)] in ("cpu", "disk")


def _check_loaded(model, store: RoastStore, device_map: dict | None = None) -> None:
    """Every tensor hf_roast owns must come from the checkpoint: the loader would leave garbage otherwise.

    Tensors of offloaded modules stay on the meta device by design and are not missing; z cannot be
    offloaded, since the layers read it directly rather than through the store's forward.
    """
    z_tensors = {f"{STORE_NAME}.{k}": t for k, t in store.z_tensors().items()}
    if store.device.type == "meta" and any(_offloaded(n, device_map) for n in z_tensors):
        raise ValueError(
            f"device_map offloads {STORE_NAME!r} (the shared array z) to {device_map.get(STORE_NAME, 'cpu/disk')!r}, "
            f"but every compressed layer reads z directly: place it on the execution device, e.g. "
            f"device_map={{{STORE_NAME!r}: 0, ...}}, or give max_memory room for z ({store.z_nbytes:,} bytes)."
        )
    owned = list(z_tensors.items())
    for name, layer in roast_layers(model):
        owned += [(f"{name}.{n}", t) for n, t in layer.owned_tensors().items()]
    missing = [
        n
        for n, t in owned
        if (t.device.type == "meta" or not getattr(t, "_is_hf_initialized", False))
        and not (t.device.type == "meta" and _offloaded(n, device_map))
    ]
    if missing:
        raise ValueError(
            f"The ROAST checkpoint lacks tensors {missing[:8]}: it is incomplete or was written for another "
            "module list. Download or save it again."
        )
    for name, t in z_tensors.items():
        bad = int((~torch.isfinite(t.detach())).sum()) if t.is_floating_point() else 0
        if bad:
            raise ValueError(
                f"The ROAST checkpoint's shared array {name} holds {bad} NaN or inf values (of "
                f"{t.numel()}): every compressed weight reads from it, so the model would output NaN. The file "
                "is damaged, or training diverged before it was saved; use an earlier checkpoint."
            )


def register() -> None:
    """Register ``"roast"`` with transformers; safe to call twice (a re-import must not raise)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not RoastQuantizationConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(RoastQuantizationConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not RoastHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(RoastHfQuantizer)


register()

__all__ = [
    "QUANT_METHOD",
    "RoastHfQuantizer",
    "RoastQuantizationConfig",
    "marker_state_dict",
    "register",
    "save_roast_model",
]
