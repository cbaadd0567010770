"""Experiment 2: a causal LM's perplexity on held-out articles, compressed without and with recovery.

No-training arms show what the least-squares projection alone keeps (1x must equal dense); recovery
arms fine-tune every arm for the same number of steps on the same batches of *other* articles. Recovered arms
(``Arm.recover_tokens``) distil the dense model into the compressed one on passages of those other articles
until a token budget (``hf_roast.recover``; a pruned model runs the same loop with AdamW), the user's
task-agnostic recovery step; a grid of rates is decided by the distillation loss of the run's last steps.
"""

from __future__ import annotations

import copy
import dataclasses
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
    # recovered arms (Arm.recover_tokens): documents per step, their truncation, and the hidden states' weight
    recover_batch_size: int = 16
    recover_max_length: int = 512
    recover_hidden_weight: float = 0.0
    """The logits' KL alone: SmolLM2's hidden states carry massive activations, so their MSE in raw units is about
    200 times the KL at the start (1,372 against about 7 on the first batches at 4x) and would decide every step; Minitron's
    recipe for retraining pruned decoders also distils the logits alone."""
    device: str = "cpu"

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
    # the documents recovered arms distil on (passages of train_texts), and their description
    recovery_text: Callable[[], list[str]] | None = None
    recovery_text_description: str = ""


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
    device = next(model.parameters()).device
    total_nll, total_count, first_logits = 0.0, 0, None
    for start in range(0, len(tokens) - 1, context):
        window = tokens[start : start + context].unsqueeze(0).to(device)
        if window.shape[1] < 2:
            break
        logits = model(input_ids=window).logits.float()
        if first_logits is None:
            first_logits = logits[0, :8].cpu()
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


def distil_pruned(
    model: nn.Module,
    teacher: nn.Module,
    docs: list[str],
    tokenizer,
    *,
    token_budget: int,
    batch_size: int,
    max_length: int,
    lr: float,
    hidden_weight: float,
    seed: int,
) -> tuple[list[float], int]:
    """``hf_roast.recover``'s steps (:func:`hf_roast.recovery.recovery_step`) on a pruned dense model, so that
    pruning gets the same recovery: the same documents per step, loss, warm-up and decay over the budget, and
    clipping, with AdamW at ``lr`` on every parameter (the fixed masks keep the pruned weights at zero). Returns
    the per-step losses and the tokens seen."""
    from hf_roast.recovery import recovery_step

    teacher.to(next(model.parameters()).device).eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    run = dict(
        token_budget=token_budget,
        batch_size=batch_size,
        max_length=max_length,
        lr=lr,
        hidden_weight=hidden_weight,
        seed=seed,
        max_grad_norm=1.0,
    )
    state = {"step": 0, "tokens": 0, "losses": [], "run": run}
    model.train()
    while state["tokens"] < token_budget:
        recovery_step(model, teacher, docs, tokenizer, optimizer, [lr], state)
    model.eval()
    return state["losses"], state["tokens"]


def recover_lm(
    model: nn.Module,
    teacher: nn.Module,
    source: LanguageModelSource,
    arm: Arm,
    setup: LanguageModelSetup,
    lr: float,
) -> dict:
    """Distil ``teacher`` into ``model`` (in place) on the source's recovery text until ``arm.recover_tokens``;
    returns the run's record: tokens, steps, first and final loss (means of 10 steps), time and memory."""
    from hf_roast import recover as distil

    docs = source.recovery_text() if source.recovery_text else source.train_texts
    kw = dict(
        token_budget=arm.recover_tokens,
        batch_size=setup.recover_batch_size,
        max_length=setup.recover_max_length,
        lr=lr,
        hidden_weight=setup.recover_hidden_weight,
        seed=arm.seed,
    )
    with ResourceMeter() as meter:
        if arm.method == "roast":
            report = distil(
                model,
                teacher,
                docs,
                source.tokenizer,
                show_progress=False,
                data_description=source.recovery_text_description or None,
                **kw,
            )
            losses, tokens, steps = report.losses, report.tokens, report.steps
        else:
            losses, tokens = distil_pruned(model, teacher, docs, source.tokenizer, **kw)
            steps = len(losses)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    head, tail = losses[:10], losses[-10:]
    return {
        "lr": lr,
        "tokens": tokens,
        "steps": steps,
        "first_loss": sum(head) / len(head),
        "final_loss": sum(tail) / len(tail),
        "documents": len(docs),
        "data": source.recovery_text_description or source.description,
        **{k: v for k, v in kw.items() if k not in ("lr",)},
        **meter.as_dict(),
    }


def _final_loss(run: dict) -> float:
    """A recovery run's rank in its grid: its final distillation loss, a diverged run (NaN, inf) last."""
    return run["final_loss"] if math.isfinite(run["final_loss"]) else math.inf


def _built(source: LanguageModelSource, arm: Arm, setup: LanguageModelSetup, cache: dict, calibration):
    """The arm's freshly compressed model, built on the setup's device (the calibrated init of SmolLM2 takes 8
    minutes on 2 CPU cores). The same compression of another budget or rate starts from the weights of the first
    one built: it is built again without calibration, then given those weights."""
    if not arm.recover_tokens:
        model, storage = build_arm_model(source.load_model().to(setup.device), arm, calibration)
        return model, storage
    same = dataclasses.replace(arm, name="", recover_tokens=0, lrs=None, grid_from=None)
    key = ("built", repr(same))
    if key in cache:
        state, storage = cache[key]
        fresh = source.load_model().to(setup.device)
        model, _ = build_arm_model(fresh, dataclasses.replace(arm, calibrate=False))
        model.load_state_dict(state)
        return model, copy.deepcopy(storage)
    model, storage = build_arm_model(source.load_model().to(setup.device), arm, calibration)
    cache[key] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, copy.deepcopy(storage))
    # the curve's first point: the same init before any recovery (every budget and rate starts from it)
    storage["perplexity_before_recovery"], _ = perplexity(model, cache["eval_tokens"], setup.context)
    cache[key][1]["perplexity_before_recovery"] = storage["perplexity_before_recovery"]
    return model, storage


def run_lm_arm(
    arm: Arm, source: LanguageModelSource, setup: LanguageModelSetup, cache: dict | None = None
) -> tuple[dict, nn.Module]:
    """Compress, optionally recover (``arm.recovery_steps`` steps of LM loss, or distillation up to
    ``arm.recover_tokens``, at each rate of ``arm.lrs``), and measure held-out perplexity."""
    from transformers import set_seed

    from .arms import finish_training

    cache = cache if cache is not None else {}
    if "eval_tokens" not in cache:
        cache["eval_tokens"] = token_stream(source.tokenizer, source.eval_texts)[: setup.eval_tokens]
    eval_tokens = cache["eval_tokens"]
    recovery_runs: list[dict] = []
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
            model, storage = _built(source, arm, setup, cache, calibration)
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
            batches = [b.to(setup.device) for b in batches]
            with ResourceMeter() as train_meter:
                losses = recover(model, batches, arm.lrs[0] if arm.lrs else setup.lr, arm.recipe)
        if arm.recover_tokens:
            if "teacher" not in cache:
                cache["teacher"] = source.load_model().to(setup.device)
            best = None
            with ResourceMeter() as train_meter:
                for i, lr in enumerate(arm.lrs or (setup.lr,)):
                    student = model if i == 0 else _built(source, arm, setup, cache, calibration)[0]
                    set_seed(arm.seed)
                    run = recover_lm(student, cache["teacher"], source, arm, setup, lr)
                    run["perplexity"], _ = perplexity(
                        student, eval_tokens, setup.context
                    )  # reported, not chosen on
                    recovery_runs.append(run)
                    if best is None or _final_loss(run) < _final_loss(best[0]):
                        best = (run, student)
                    else:
                        del student
            model = best[1]
        finish_training(model, arm)
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
    if recovery_runs:
        chosen = min(recovery_runs, key=_final_loss)
        result["recovery"] = chosen
        result["recovery_runs"] = recovery_runs
        result["selected_lr"] = chosen["lr"]
    if arm.method == "dense":
        cache["dense_first_logits"] = first_logits
    if "dense_first_logits" in cache and first_logits is not None:
        result["max_abs_logit_diff_vs_dense"] = float(
            (first_logits - cache["dense_first_logits"]).abs().max()
        )
    return result, model
