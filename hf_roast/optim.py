"""The default fine-tuning recipe of a compressed model: per-group learning rates, in the manner of LoRA+.

A compressed pre-trained model does not fine-tune well with one learning rate for every parameter:

* the shared array ``z`` holds every compressed weight, so its per-element Adam step moves about as
  many weights as a dense step does; it wants about the dense learning rate *in weight units* (the
  rate divided by the RMS of the module scales ``lambda``), a few times higher since each slot now
  serves several weights;
* the parameters that stay uncompressed (embeddings, norms, biases) must adapt to weights that the
  projection onto ``z`` has mostly averaged away, and want a much higher rate;
* a freshly initialised task head (``classifier``, ``score``...) has nothing to keep and wants the
  highest rate of all.

:func:`create_roast_optimizer` builds that optimizer from the one learning rate a user would use to
fine-tune the dense model; :class:`RoastTrainer` is a ``transformers.Trainer`` that builds it.
The default ratios were chosen by measurement (README, "Fine-tuning recipe").
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint_format import STORE_NAME

DEFAULT_Z_LR_RATIO = 4.0
"""z's learning rate over the dense one, in weight units."""
DEFAULT_UNCOMPRESSED_LR_RATIO = 20.0
"""The learning rate of parameters left dense (embeddings, norms, biases) over the dense one."""
DEFAULT_HEAD_LR_RATIO = 20.0
"""The learning rate of freshly initialised task heads over the dense one."""
DEFAULT_HEAD_MODULES = ("classifier", "score", "qa_outputs", "pre_classifier")
"""Task heads that ``AutoModelFor*`` initialises from scratch (PEFT's ``modules_to_save`` defaults)."""

GROUP_NAMES = ("z", "uncompressed", "uncompressed_no_decay", "head", "head_no_decay")


@dataclass(frozen=True)
class RoastRecipe:
    """Learning-rate ratios of the parameter groups, relative to the dense fine-tuning rate."""

    z_lr_ratio: float = DEFAULT_Z_LR_RATIO
    uncompressed_lr_ratio: float = DEFAULT_UNCOMPRESSED_LR_RATIO
    head_lr_ratio: float = DEFAULT_HEAD_LR_RATIO

    def __post_init__(self) -> None:
        for name in ("z_lr_ratio", "uncompressed_lr_ratio", "head_lr_ratio"):
            value = getattr(self, name)
            if (
                not isinstance(value, (int, float))
                or not value > 0
                or value != value
                or value == float("inf")
            ):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}.")


def z_weight_multiplier(model: nn.Module) -> float:
    """``1 / RMS(lambda)``: turns a learning rate in weight units into one for ``z``.

    A weight is ``W = lambda * g * z``, and Adam's step is scale-free, so a step of ``lr`` on ``z`` moves
    W by ``lambda * lr``. Dividing by the RMS of the module scales (weighted by module size) makes
    ``lr`` mean the same for ``z`` as for a dense weight. hf-roast picks z's scale so this is near 1.
    """
    store = _store_of(model)
    modules = store.plan.modules
    weights = sum(m.rows * m.cols for m in modules)
    rms = (sum(m.rows * m.cols * m.scale**2 for m in modules) / weights) ** 0.5
    return 1.0 / rms


def _store_of(model: nn.Module):
    store = getattr(model, STORE_NAME, None)
    if store is None:
        base = getattr(model, "base_model", None)
        store = getattr(base, STORE_NAME, None) if base is not None else None
    if store is None:
        raise ValueError(
            f"{type(model).__name__} is not ROAST-compressed, so it has no shared array z: compress it with "
            "get_roast_model(model, RoastConfig(...)) first, or use a plain optimizer for a dense model."
        )
    return store


def _is_head(name: str, head_modules: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(h in parts[:-1] for h in head_modules)


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norms and other vectors get no weight decay, as in the HF Trainer."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def roast_parameter_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    recipe: RoastRecipe | None = None,
    head_modules: Iterable[str] = DEFAULT_HEAD_MODULES,
) -> list[dict]:
    """The optimizer's parameter groups, each a dict with ``params``, ``lr``, ``weight_decay`` and ``name``.

    Every trainable parameter lands in exactly one group; frozen parameters are left out. ``z`` gets no
    weight decay: decaying it would shrink every compressed weight at once.
    """
    if not (isinstance(lr, (int, float)) and lr > 0 and lr != float("inf")):
        raise ValueError(
            f"lr must be a positive learning rate (the one you would fine-tune the dense model with), got {lr!r}."
        )
    recipe = recipe or RoastRecipe()
    head_modules = tuple(head_modules)
    z = _store_of(model).z
    groups: dict[str, list] = {name: [] for name in GROUP_NAMES}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param is z:
            groups["z"].append(param)
            continue
        kind = "head" if _is_head(name, head_modules) else "uncompressed"
        groups[kind + ("_no_decay" if _no_decay(name, param) else "")].append(param)
    rates = {
        "z": lr * recipe.z_lr_ratio * z_weight_multiplier(model),
        "uncompressed": lr * recipe.uncompressed_lr_ratio,
        "head": lr * recipe.head_lr_ratio,
    }
    out = []
    for name, params in groups.items():
        if not params:
            continue
        base = name.removesuffix("_no_decay")
        decay = 0.0 if name == "z" or name.endswith("_no_decay") else weight_decay
        out.append({"params": params, "lr": rates[base], "weight_decay": decay, "name": name})
    return out


def create_roast_optimizer(
    model: nn.Module,
    lr: float,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    weight_decay: float = 0.0,
    z_lr_ratio: float = DEFAULT_Z_LR_RATIO,
    uncompressed_lr_ratio: float = DEFAULT_UNCOMPRESSED_LR_RATIO,
    head_lr_ratio: float = DEFAULT_HEAD_LR_RATIO,
    head_modules: Iterable[str] = DEFAULT_HEAD_MODULES,
    **optimizer_kwargs,
) -> torch.optim.Optimizer:
    """An optimizer with hf-roast's fine-tuning recipe (PEFT's ``create_loraplus_optimizer`` is the model).

    Args:
        model: a model returned by :func:`hf_roast.get_roast_model` (or loaded compressed).
        lr: the learning rate you would use to fine-tune the *dense* model, e.g. 5e-5 for a BERT.
        optimizer_cls: the optimizer class; AdamW by default.
        weight_decay: decay of the uncompressed matrices and the head (never of z, norms or biases).
        z_lr_ratio: z's rate over ``lr``, in weight units (see :func:`z_weight_multiplier`).
        uncompressed_lr_ratio: the rate of embeddings, norms and biases left dense over ``lr``.
        head_lr_ratio: the rate of freshly initialised heads (``head_modules``) over ``lr``.
        optimizer_kwargs: passed to ``optimizer_cls`` (``betas``, ``eps``...).
    """
    recipe = RoastRecipe(z_lr_ratio, uncompressed_lr_ratio, head_lr_ratio)
    groups = roast_parameter_groups(model, lr, weight_decay, recipe, head_modules)
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)


@functools.cache
def roast_trainer_class(base: type | None = None) -> type:
    """``RoastTrainer`` on top of ``base`` (``transformers.Trainer`` by default, or a subclass of it such as
    :class:`hf_roast.DistillationTrainer`), so the recipe combines with any Trainer."""
    from transformers import Trainer

    base = base or Trainer
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise TypeError(f"base must be transformers.Trainer or a subclass of it, got {base!r}.")

    class RoastTrainer(base):
        """A drop-in ``transformers.Trainer`` that fine-tunes a compressed model with hf-roast's recipe.

        ``args.learning_rate`` is the rate you would use for the dense model; the optimizer's groups get
        the recipe's ratios of it (:func:`create_roast_optimizer`), and the Trainer's scheduler scales
        every group alike. ``roast_recipe=RoastRecipe(...)`` overrides the ratios. Passing your own
        ``optimizers=(opt, sched)`` keeps yours, as with the plain Trainer.
        """

        def __init__(self, *args, roast_recipe: RoastRecipe | None = None, **kwargs):
            self.roast_recipe = roast_recipe or RoastRecipe()
            super().__init__(*args, **kwargs)

        def create_optimizer(self, model=None):
            if self.optimizer is not None:
                return self.optimizer
            model = model if model is not None else self.model
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k != "lr"}
            groups = roast_parameter_groups(
                model, self.args.learning_rate, self.args.weight_decay, self.roast_recipe
            )
            self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
            return self.optimizer

    if base is not Trainer:
        RoastTrainer.__name__ = RoastTrainer.__qualname__ = f"Roast{base.__name__}"
    return RoastTrainer


@functools.cache
def sliceout_callback_class() -> type:
    """``SliceOutCallback``, a ``transformers.TrainerCallback`` (built on first use: importing transformers'
    trainer modules costs seconds, and ``import hf_roast`` should not)."""
    from transformers import TrainerCallback

    from .sliceout import enable_sliceout

    class SliceOutCallback(TrainerCallback):
        """Sets SliceOut's keep fraction before every optimizer step of a ``transformers.Trainer``.

        ``keep``: a fraction in (0, 1], or ``keep(step, max_steps) -> fraction`` for a schedule (e.g. return
        1.0 for the last steps so training ends on the full model). ``mode`` and ``seed`` as
        :class:`~hf_roast.config.RoastConfig`'s ``sliceout_mode`` / ``sliceout_seed``. Evaluation runs the full
        model regardless (the Trainer evaluates in eval mode)."""

        def __init__(self, keep=0.5, mode: str = "random", seed: int = 0):
            self.keep, self.mode, self.seed = keep, mode, seed

        def keep_at(self, step: int, max_steps: int) -> float:
            return float(self.keep(step, max_steps)) if callable(self.keep) else self.keep

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            enable_sliceout(model, self.keep_at(state.global_step, state.max_steps), self.mode, self.seed)

    return SliceOutCallback
