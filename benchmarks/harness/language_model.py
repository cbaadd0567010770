"""Experiment 2: a causal LM's perplexity on held-out articles, compressed without and with recovery.

No-training arms show what the least-squares projection alone keeps (1x must equal dense); recovery
arms fine-tune every arm for the same number of steps on the same batches of *other* articles.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from hf_roast.optim import RoastRecipe, roast_parameter_groups

from .arms import Arm, build_arm_model
from .measure import ResourceMeter
from .training import single_rate_groups


@dataclass
class LanguageModelSetup:
    context: int = 512
    eval_tokens: int = 8192
    train_batch_size: int = 4
    train_context: int = 256
    lr: float = 1e-4
    seed: int = 0
    calibration_batches: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LanguageModelSource:
    name: str
    load_model: Callable[[], nn.Module]
    tokenizer: object
    train_texts: list[str]
    eval_texts: list[str]
    description: str


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, context: int) -> tuple[float, torch.Tensor]:
    """exp(mean next-token NLL) over non-overlapping windows; also the first window's logits (for 1x checks)."""
    model.eval()
    total_nll, total_count, first_logits = 0.0, 0, None
    for start in range(0, len(tokens) - 1, context):
        window = tokens[start : start + context].unsqueeze(0)
        if window.shape[1] < 2:
            break
        logits = model(input_ids=window).logits.float()
        if first_logits is None:
            first_logits = logits[0, :8].clone()
        nll = nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        total_nll += float(nll)
        total_count += window.shape[1] - 1
    return math.exp(total_nll / total_count), first_logits


def recovery_batches(
    tokens: torch.Tensor, steps: int, batch: int, context: int, seed: int
) -> list[torch.Tensor]:
    """The same random windows of the training articles for every arm."""
    rng = random.Random(seed)
    if len(tokens) <= context:
        raise ValueError(f"Training text has {len(tokens)} tokens, fewer than one window of {context}.")
    return [
        torch.stack(
            [tokens[s : s + context] for s in (rng.randrange(len(tokens) - context) for _ in range(batch))]
        )
        for _ in range(steps)
    ]


def recover(
    model: nn.Module, batches: list[torch.Tensor], lr: float, recipe: tuple | None = None
) -> list[float]:
    """A short AdamW fine-tune with constant learning rate (z's in weight units, see ``benchmarks.harness.training.single_rate_groups``),
    or with ``recipe`` the library's per-group rates (``create_roast_optimizer``'s) around ``lr``; pruned masks stay
    fixed (their hooks)."""
    if recipe:
        groups = roast_parameter_groups(model, lr, recipe=RoastRecipe(*recipe))
    else:
        groups, _ = single_rate_groups(model, lr)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def run_lm_arm(
    arm: Arm, source: LanguageModelSource, setup: LanguageModelSetup, cache: dict | None = None
) -> tuple[dict, nn.Module]:
    """Compress, optionally recover for ``arm.recovery_steps`` steps, and measure held-out perplexity."""
    from transformers import set_seed

    cache = cache if cache is not None else {}
    if "eval_tokens" not in cache:
        cache["eval_tokens"] = token_stream(source.tokenizer, source.eval_texts)[: setup.eval_tokens]
    eval_tokens = cache["eval_tokens"]
    with ResourceMeter() as whole:
        set_seed(arm.seed)
        if (arm.recovery_steps or arm.calibrate) and "train_tokens" not in cache:
            cache["train_tokens"] = token_stream(source.tokenizer, source.train_texts)
        calibration = None
        if arm.calibrate:  # windows of the training articles, drawn apart from the recovery batches
            calibration = recovery_batches(
                cache["train_tokens"],
                setup.calibration_batches,
                setup.train_batch_size,
                setup.train_context,
                setup.seed + 1,
            )
        with ResourceMeter() as init_meter:
            model, storage = build_arm_model(source.load_model(), arm, calibration)
        losses: list[float] = []
        train_meter = None
        if arm.recovery_steps:
            batches = recovery_batches(
                cache["train_tokens"],
                arm.recovery_steps,
                setup.train_batch_size,
                setup.train_context,
                setup.seed,
            )
            with ResourceMeter() as train_meter:
                losses = recover(model, batches, arm.lrs[0] if arm.lrs else setup.lr, arm.recipe)
        with ResourceMeter() as eval_meter:
            ppl, first_logits = perplexity(model, eval_tokens, setup.context)
    if arm.method == "prune":
        from .baselines import finalize_pruning

        storage["kept_values_after_training"] = finalize_pruning(model)
    result = {
        "experiment": "language_model",
        "arm": arm.to_dict(),
        "source": source.name,
        "data": source.description,
        "setup": setup.to_dict(),
        "eval_tokens": int(len(eval_tokens)),
        "perplexity": ppl,
        "recovery_losses": losses,
        "storage": storage,
        "init_wall_seconds": round(init_meter.seconds, 2),
        "train_wall_seconds": round(train_meter.seconds, 2) if train_meter else 0.0,
        "train_peak_rss_mb": round(train_meter.peak_rss / 2**20, 1) if train_meter else None,
        "eval_wall_seconds": round(eval_meter.seconds, 2),
        "arm_wall_seconds": round(whole.seconds, 2),
        "arm_peak_rss_mb": round(whole.peak_rss / 2**20, 1),
    }
    if arm.method == "dense":
        cache["dense_first_logits"] = first_logits
    if "dense_first_logits" in cache and first_logits is not None:
        result["max_abs_logit_diff_vs_dense"] = float(
            (first_logits - cache["dense_first_logits"]).abs().max()
        )
    return result, model
