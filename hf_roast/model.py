"""RoastModel: the wrapper users hold, and get_roast_model, its entry point."""

from __future__ import annotations

import functools
import inspect
import os

import torch
from torch import nn

from .compress import compress_model
from .config import RoastConfig
from .layers import STORE_NAME, RoastEmbedding, RoastLinear, RoastStore

FORMAT_VERSION = "1.1"
"""Version of the on-disk layout (file names and keys), "major.minor"; independent of the mapping version.

1.0 (stored as the integer 1): the first layout. 1.1: adds ``plan_sha256``. A reader loads any older
version and a newer minor one (ignoring the keys it does not know, with a warning); it refuses a newer
major one.
"""


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
    """
    config = config or RoastConfig()
    compress_model(
        model,
        config,
        show_progress=show_progress,
        calibration_data=calibration_data,
        calibration=calibration,
    )
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

    def roast_layers(self) -> list[tuple[str, nn.Module]]:
        return [
            (n, m) for n, m in self.base_model.named_modules() if isinstance(m, (RoastLinear, RoastEmbedding))
        ]

    def _unique_parameters(self):
        seen = set()
        for p in self.base_model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self._unique_parameters() if p.requires_grad)
        total = sum(p.numel() for p in self._unique_parameters())
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
        store = self.roast_store
        layers = self.roast_layers()
        dense_target = sum(m.spec.numel for _, m in layers)
        dense_target_bytes = sum(m.spec.numel * m._dtype_probe.element_size() for _, m in layers)
        z = store.z
        stored_target, stored_target_bytes = z.numel(), z.numel() * z.element_size()
        other = [p for p in self._unique_parameters() if p is not z]
        other_buffers = [b for n, b in self.base_model.named_buffers() if n.endswith("padding_row")]
        other_n = sum(p.numel() for p in other) + sum(b.numel() for b in other_buffers)
        other_bytes = sum(p.numel() * p.element_size() for p in other) + sum(
            b.numel() * b.element_size() for b in other_buffers
        )

        def block(dense_n, dense_b, stored_n, stored_b):
            return {
                "dense_parameters": dense_n,
                "stored_parameters": stored_n,
                "dense_bytes": dense_b,
                "stored_bytes": stored_b,
                "ratio": dense_n / stored_n,
                "bytes_ratio": dense_b / stored_b,
            }

        plan = store.plan
        return {
            "target": block(dense_target, dense_target_bytes, stored_target, stored_target_bytes),
            "model": block(
                dense_target + other_n,
                dense_target_bytes + other_bytes,
                stored_target + other_n,
                stored_target_bytes + other_bytes,
            ),
            "num_modules": len(layers),
            "mapper": plan.mapper,
            "tile": list(plan.tile),
            "sign": plan.sign,
            "seed": plan.seed,
            "scaler": store.scaler,
            "mapping_version": plan.mapping_version,
        }

    # ---- conversion ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """A plain dense HF model whose outputs equal the compressed one's; the wrapper is left unusable."""
        from transformers.pytorch_utils import Conv1D

        model = self.base_model
        for name, layer in self.roast_layers():
            w = layer.materialize_weight()
            if isinstance(layer, RoastEmbedding):
                dense = nn.Embedding(
                    layer.num_embeddings, layer.embedding_dim, layer.padding_idx, device=w.device
                )
                dense.weight = nn.Parameter(w)
            elif layer.spec.kind == "conv1d":
                dense = Conv1D(layer.out_features, layer.in_features)
                dense.weight = nn.Parameter(w)
                dense.bias = nn.Parameter(layer.bias.detach().clone())
            else:
                dense = nn.Linear(
                    layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta"
                )
                dense.weight = nn.Parameter(w)
                if layer.bias is not None:
                    dense.bias = nn.Parameter(layer.bias.detach().clone())
            dense.train(layer.training)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
        delattr(model, STORE_NAME)
        _forget_roast(model)
        return model

    # ---- persistence --------------------------------------------------------------------------------
    def roast_config_dict(self) -> dict:
        d = self.roast_config.to_dict()
        d["format_version"] = FORMAT_VERSION
        d["plan"] = self.plan.to_dict()
        d["plan_sha256"] = self.plan.digest()
        d["scaler"] = self.roast_store.scaler
        return d

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> list[str]:
        """Write the checkpoint folder; returns the names of the files written.

        ``config.json`` (with ``quantization_config``, so that ``AutoModel*.from_pretrained`` loads it after
        ``import hf_roast``), ``roast_config.json``, ``model.safetensors`` (z once, no dense copy) and a
        ``README.md`` model card. Card options: ``base_model``, ``license``, ``repo_id``, ``model_card=False``.
        Other keyword arguments go to transformers' ``save_pretrained`` (e.g. ``max_shard_size``).
        """
        from .serialization import save_roast_model

        return save_roast_model(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> RoastModel:
        """Load a checkpoint from a folder or a Hub repo id, without allocating dense target weights.

        ``revision``, ``token``, ``cache_dir``, ``local_files_only`` and ``force_download`` go to
        huggingface_hub; other keyword arguments (``dtype``, ``device_map``...) to transformers'
        ``from_pretrained``, whose quantizer path (the one ``AutoModel*`` takes) builds the model.
        """
        from .serialization import load_roast_model

        return load_roast_model(pretrained_model_name_or_path, **kwargs)

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
        from .hub import push_checkpoint

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


def _forget_roast(model: nn.Module) -> None:
    """Drop every trace of ROAST from a densified model, so that it saves and reloads as a plain one."""
    for attr in (
        "roast_config",
        "hf_quantizer",
        "save_pretrained",
    ):  # see quantizer._save_as_roast_checkpoint
        model.__dict__.pop(attr, None)
    config = getattr(model, "config", None)
    if config is not None:
        config.__dict__.pop("quantization_config", None)
    for flag in ("is_quantized", "quantization_method"):
        model.__dict__.pop(flag, None)


__all__ = ["RoastModel", "get_roast_model"]
