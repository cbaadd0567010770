"""RoastModel: the wrapper users hold, and get_roast_model, its entry point."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os

from torch import nn

from .checkpoint.folder import drop_quantization_state, load_checkpoint
from .checkpoint.hub import push_checkpoint
from .checkpoint_format import STORE_NAME, roast_config_dict
from .compress import compress_model, merge_model
from .config import RoastConfig
from .layers import RoastLayer, RoastStore, roast_layers
from .quantizer import save_roast_model
from .report import compression_report, unique_parameters
from .sliceout import enable_sliceout


def get_roast_model(
    model: nn.Module,
    config: RoastConfig | None = None,
    show_progress: bool | None = None,
    calibration_data=None,
    calibration: str = "output",
):
    """Compress ``model``'s target modules in place with ROAST / STABLE-RPS and wrap it.

    The dense weights of the target modules are projected onto the shared array z (least squares,
    ``init="pretrained"``) or replaced by a random z with each module's init scale (``init="random"``).
    ``calibration_data``: a few batches of model inputs (tokenizer output dicts or input-id tensors).
    When given, the projection keeps best what the data reads: ``calibration="output"`` (default)
    minimises each layer's output error on those inputs, ``"diagonal"`` weights each input column by its
    mean squared activation (as AWQ / ASVD). See :mod:`hf_roast.calibration`.
    ``config.sliceout_keep < 1`` switches SliceOut on for training (:func:`hf_roast.sliceout.enable_sliceout`).
    """
    config = config or RoastConfig()
    compress_model(
        model,
        config,
        show_progress=show_progress,
        calibration_data=calibration_data,
        calibration=calibration,
    )
    if config.sliceout_keep < 1.0:
        enable_sliceout(model, config.sliceout_keep, config.sliceout_mode, config.sliceout_seed)
    return RoastModel(model, config)


@functools.cache
def _wrapper_class(base_cls: type) -> type:
    """A RoastModel subclass whose ``forward`` has the wrapped class's signature.

    The HF Trainer reads the *class's* forward signature to find label names and to drop dataset
    columns; a bare ``forward(*args, **kwargs)`` would silently lose ``input_ids`` and ``labels``.
    """

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    forward.__signature__ = inspect.signature(base_cls.forward)
    forward.__doc__ = base_cls.forward.__doc__
    return type(f"Roast{base_cls.__name__}", (RoastModel,), {"forward": forward, "__module__": __name__})


class RoastModel(nn.Module):
    """A transformers model whose target modules read their weights from one shared array z.

    Attributes and methods it does not define (``generate``, ``config``, ``device``,
    ``gradient_checkpointing_enable``...) are forwarded to the wrapped model.
    """

    def __new__(cls, model: nn.Module = None, roast_config: RoastConfig | None = None):
        if cls is RoastModel and model is not None:
            cls = _wrapper_class(type(model))
        return super().__new__(cls)

    def __init__(self, model: nn.Module, roast_config: RoastConfig):
        super().__init__()
        if not hasattr(model, STORE_NAME):
            raise ValueError(
                "RoastModel wraps a compressed model: use get_roast_model(model, RoastConfig(...))."
            )
        self.base_model = model
        self.roast_config = roast_config
        self.training = model.training  # a wrapper of an eval-mode model starts in eval mode too

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    # ---- introspection ------------------------------------------------------------------------------
    def get_base_model(self) -> nn.Module:
        return self.base_model

    @property
    def roast_store(self) -> RoastStore:
        return getattr(self.base_model, STORE_NAME)

    @property
    def plan(self):
        return self.roast_store.plan

    def roast_layers(self) -> list[tuple[str, RoastLayer]]:
        return roast_layers(self.base_model)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in unique_parameters(self.base_model) if p.requires_grad)
        total = sum(p.numel() for p in unique_parameters(self.base_model))
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        report = self.compression_report()["model"]
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
            f" || dense params: {report['dense_parameters']:,d} || compression: {report['ratio']:.2f}x"
        )

    def compression_report(self) -> dict:
        """Dense vs stored parameter counts and bytes, over the target modules and the whole model."""
        return compression_report(self.base_model)

    # ---- conversion ---------------------------------------------------------------------------------
    def quantize_z(self, bits: int | None = None, group_size: int | None = None) -> RoastModel:
        """Post-training quantisation of z to ``bits`` (8 or 4) with one fp32 scale per ``group_size`` values.

        z is then stored packed (``z_bits`` in the config; checkpoints hold the codes and scales) and read,
        dequantised, tile by tile; it no longer trains. ``bits`` defaults to the config's integer ``z_bits``
        (a QAT model keeps its grid), ``group_size`` to its ``z_group_size``. Returns ``self``.
        """
        config = self.roast_config
        if bits is None:
            if not config.z_qat:
                raise ValueError("quantize_z needs bits=8 or bits=4 (z is stored as floats now).")
            bits = config.z_bits
        group_size = config.z_group_size if group_size is None else group_size
        # validate the whole config first: a bad bits / group size is refused before z changes
        new_config = dataclasses.replace(
            config, dtype="float32", z_bits=bits, z_group_size=group_size, z_qat=False
        )
        self.roast_store.quantize_(bits, group_size)
        self.roast_config = new_config
        return self

    def merge_and_unload(self) -> nn.Module:
        """A plain dense HF model whose outputs equal the compressed one's; the wrapper is left unusable."""
        model = merge_model(self.base_model)
        drop_quantization_state(model)
        return model

    # ---- persistence --------------------------------------------------------------------------------
    def roast_config_dict(self) -> dict:
        """The content of ``roast_config.json`` for this model (see :mod:`hf_roast.checkpoint_format`)."""
        return roast_config_dict(self.roast_config, self.plan, self.roast_store.scaler)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> list[str]:
        """Write the checkpoint folder; returns the names of the files written.

        ``config.json`` (with ``quantization_config``, so that ``AutoModel*.from_pretrained`` loads it after
        ``import hf_roast``), ``roast_config.json``, ``model.safetensors`` (z once, no dense copy) and a
        ``README.md`` model card. Card options: ``base_model``, ``license``, ``repo_id``, ``model_card=False``;
        ``recovery=`` (a :class:`hf_roast.recovery.RecoveryReport` dict) records a recovery run.
        Other keyword arguments go to transformers' ``save_pretrained`` (e.g. ``max_shard_size``).
        """
        return save_roast_model(self.base_model, self.roast_config, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> RoastModel:
        """Load a checkpoint from a folder or a Hub repo id, without allocating dense target weights.

        ``revision``, ``token``, ``cache_dir``, ``local_files_only`` and ``force_download`` go to
        huggingface_hub; other keyword arguments (``dtype``, ``device_map``...) to transformers'
        ``from_pretrained``, whose quantizer path (the one ``AutoModel*`` takes) builds the model.
        """
        model, config = load_checkpoint(pretrained_model_name_or_path, **kwargs)
        return RoastModel(model, config)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **save_kwargs,
    ):
        """Upload exactly what :meth:`save_pretrained` writes (model card included) as one commit.

        Goes through ``huggingface_hub`` (``create_repo`` + ``upload_folder``); returns its ``CommitInfo``.
        """
        return push_checkpoint(
            self,
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            **save_kwargs,
        )


__all__ = ["RoastModel", "get_roast_model"]
