"""Experiment 1: fine-tune a sentence classifier per arm, pick the learning rate on validation, score test.

Every arm gets the same data, the same tokenisation, the same recipe and the same learning-rate grid;
the learning rate is chosen on the validation split (carved from train) and the chosen model alone is
scored on test, once.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from hf_roast.optim import RoastRecipe, roast_trainer_class, z_weight_multiplier

from .arms import Arm, build_arm_model, finish_training
from .data import TextClassificationData, cache_dir
from .measure import ResourceMeter
from .training import single_rate_groups


@dataclass
class ClassificationSetup:
    """The recipe shared by all arms."""

    epochs: float = 1.0
    batch_size: int = 32
    max_length: int = 64
    lr_grid: tuple[float, ...] = (1e-4, 3e-4)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    eval_batch_size: int = 128
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lr_grid"] = list(self.lr_grid)
        return d


@dataclass
class ClassificationSource:
    """Where models and data come from: the real MiniLM + Rotten Tomatoes, or a tiny synthetic stand-in."""

    name: str
    load_model: Callable[[int], nn.Module]
    tokenizer: object
    data: TextClassificationData
    # unlabelled text for the arms that recover before the task (Arm.recover_tokens), and its description
    recovery_text: Callable[[], list[str]] | None = None
    recovery_text_description: str = ""


RECOVERY_LR = 1e-4
"""``hf_roast.recover``'s rate for the recovered arms: the rate dense fine-tunes at on this task (its grid's
choice); the recipe's groups take their ratios of it, as in fine-tuning."""
RECOVERY_BATCH = 32
RECOVERY_MAX_LENGTH = 128
"""Wikipedia passages of up to ~450 characters (``data.wikipedia_passages``) fit in 128 tokens."""
RECOVERY_HIDDEN_WEIGHT = 1.0
"""The hidden-state MSE's weight beside the logits' KL (``recover``'s default). The logits are those of the
classifier's fresh head, which teacher and student share, so the hidden states carry the signal."""


def recover_before_task(model: nn.Module, teacher: nn.Module, source: ClassificationSource, arm: Arm) -> dict:
    """Distil the dense model into the freshly compressed one on the source's unlabelled text, in place, until
    ``arm.recover_tokens`` tokens (``hf_roast.recover``); returns its record for the arm's result."""
    from hf_roast import recover

    if source.recovery_text is None:
        raise ValueError(
            f"Arm {arm.name} recovers before the task, but the source {source.name} has no text."
        )
    with ResourceMeter() as meter:
        report = recover(
            model,
            teacher,
            source.recovery_text(),
            source.tokenizer,
            token_budget=arm.recover_tokens,
            batch_size=RECOVERY_BATCH,
            max_length=RECOVERY_MAX_LENGTH,
            lr=RECOVERY_LR,
            hidden_weight=RECOVERY_HIDDEN_WEIGHT,
            seed=arm.seed,
            data_description=source.recovery_text_description,
            show_progress=False,
        )
    head = report.losses[:10]
    record = report.to_dict()
    record["first_loss"] = sum(head) / max(1, len(head))
    record.update(meter.as_dict())
    return record


def _encode(tokenizer, texts: list[str], labels: list[int], max_length: int):
    from datasets import Dataset

    enc = tokenizer(texts, truncation=True, max_length=max_length)
    columns = {k: enc[k] for k in enc.keys()}
    columns["labels"] = labels
    return Dataset.from_dict(columns)


def calibration_batches(dataset, tokenizer, batch_size: int, examples: int = 256) -> list[dict]:
    """The first ``examples`` training examples as padded input batches, for the activation-aware init."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    n = min(examples, len(dataset))
    batches = [
        collate([dataset[i] for i in range(s, min(s + batch_size, n))]) for s in range(0, n, batch_size)
    ]
    return [{k: v for k, v in b.items() if k != "labels"} for b in batches]


@torch.no_grad()
def accuracy(model: nn.Module, dataset, tokenizer, batch_size: int) -> float:
    """Plain accuracy; batches sorted by length so padding costs little."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    was_training = model.training
    model.eval()
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
    correct = 0
    for start in range(0, len(order), batch_size):
        batch = collate([dataset[i] for i in order[start : start + batch_size]])
        labels = batch.pop("labels")
        logits = model(**batch).logits
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / len(dataset)


def train(
    model: nn.Module,
    train_set,
    tokenizer,
    setup: ClassificationSetup,
    lr: float,
    seed: int,
    arm: Arm,
    teacher,
):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_roast.distill import DistillationTrainer

    args = TrainingArguments(
        output_dir=str(cache_dir() / "trainer"),
        per_device_train_batch_size=setup.batch_size,
        num_train_epochs=setup.epochs * arm.schedule,
        learning_rate=lr,
        warmup_steps=math.ceil(
            setup.warmup_ratio * setup.epochs * arm.schedule * math.ceil(len(train_set) / setup.batch_size)
        ),
        weight_decay=setup.weight_decay,
        lr_scheduler_type="linear",
        train_sampling_strategy="group_by_length",  # similar lengths per batch: far less padding
        seed=seed,
        data_seed=seed,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    kwargs = dict(
        model=model, args=args, train_dataset=train_set, data_collator=DataCollatorWithPadding(tokenizer)
    )
    if arm.recipe:
        # hf-roast's fine-tuning recipe: RoastTrainer's parameter groups (its optimizer, Trainer's scheduler)
        recipe = RoastRecipe(*arm.recipe)
        multiplier = z_weight_multiplier(model) * recipe.z_lr_ratio
        base = DistillationTrainer if arm.distill else Trainer
        trainer_cls = roast_trainer_class(base)
        kwargs["roast_recipe"] = recipe
    else:
        groups, multiplier = single_rate_groups(model, lr)
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=setup.weight_decay)
        kwargs["optimizers"] = (optimizer, None)
        trainer_cls = DistillationTrainer if arm.distill else Trainer
    if arm.distill:
        kwargs.update(
            teacher=teacher,
            alpha=setup.distill_alpha,
            temperature=setup.distill_temperature,
            hidden_weight=arm.distill_hidden,
        )
    trainer = trainer_cls(**kwargs)
    result = trainer.train()
    return float(result.training_loss), multiplier


def saved_bytes_check(model: nn.Module, storage: dict) -> dict:
    """Save a low-bit model in its packed format and read back the bytes of its tensors: the bytes the arm
    reports are the bytes it writes (a mismatch is a bug in the accounting, so it raises)."""
    import tempfile
    from pathlib import Path

    from .sparse_int4 import save_model

    with tempfile.TemporaryDirectory() as folder:
        saved = save_model(model, Path(folder) / "model.safetensors")
    if (saved["target"], saved["model"]) != (storage["target_bytes"], storage["model_bytes"]):
        raise RuntimeError(
            f"the saved file holds {saved}, the accounting says {storage['target_bytes']} / "
            f"{storage['model_bytes']} bytes (targets / model)"
        )
    return {"saved_target_bytes": saved["target"], "saved_model_bytes": saved["model"]}


def run_classification_arm(
    arm: Arm, source: ClassificationSource, setup: ClassificationSetup, teacher: nn.Module | None = None
) -> tuple[dict, nn.Module]:
    """Train the arm once per learning rate, keep the best on validation, score it on test."""
    from transformers import set_seed

    data = source.data
    tok = source.tokenizer
    train_set = _encode(tok, data.train_texts, data.train_labels, setup.max_length)
    val_set = _encode(tok, data.val_texts, data.val_labels, setup.max_length)
    test_set = _encode(tok, data.test_texts, data.test_labels, setup.max_length)
    if arm.distill and teacher is None:
        raise ValueError(f"Arm {arm.name} distils, but no dense teacher was given: run the dense arm first.")
    grid = arm.lrs or setup.lr_grid
    runs, best, best_model, storage = [], None, None, None
    recovered = None  # (state, record): recovery does not depend on the fine-tune's rate, so it runs once
    with ResourceMeter() as whole:
        for lr in grid:
            set_seed(arm.seed)
            calibration = calibration_batches(train_set, tok, setup.batch_size) if arm.calibrate else None
            dense = source.load_model(len(data.label_names))
            # the teacher keeps the student's fresh head
            teacher_copy = copy.deepcopy(dense) if arm.recover_tokens and recovered is None else None
            model, storage = build_arm_model(dense, arm, calibration)
            if arm.recover_tokens:
                if recovered is None:
                    record = recover_before_task(model, teacher_copy, source, arm)
                    recovered = ({k: v.detach().clone() for k, v in model.state_dict().items()}, record)
                    del teacher_copy
                else:
                    model.load_state_dict(recovered[0])
                storage["recovery"] = recovered[1]
            with ResourceMeter() as meter:
                loss, z_lr_multiplier = train(model, train_set, tok, setup, lr, arm.seed, arm, teacher)
            finish_training(model, arm)  # quantised arms are scored as they are stored
            val = accuracy(model, val_set, tok, setup.eval_batch_size)
            run = {"lr": lr, "z_lr_multiplier": z_lr_multiplier, "val_accuracy": val, "train_loss": loss}
            run.update(meter.as_dict())
            runs.append(run)
            if best is None or val > best["val_accuracy"]:
                best, best_model = run, model
            else:
                del model
        test = accuracy(best_model, test_set, tok, setup.eval_batch_size)
    if arm.method == "prune":
        from .baselines import finalize_pruning

        nonzero = finalize_pruning(best_model)
        storage["kept_values_after_training"] = nonzero
    if arm.method == "lowbit":
        storage.update(saved_bytes_check(best_model, storage))
    result = {
        "experiment": "classification",
        "arm": arm.to_dict(),
        "source": source.name,
        "data": data.description,
        "setup": setup.to_dict(),
        "train_examples": len(data.train_texts),
        "val_examples": len(data.val_texts),
        "test_examples": len(data.test_texts),
        "lr_search": runs,
        "selected_lr": best["lr"],
        "val_accuracy": best["val_accuracy"],
        "test_accuracy": test,
        "storage": storage,
        "train_wall_seconds": best["wall_seconds"],
        "train_peak_rss_mb": best["peak_rss_mb"],
        "arm_wall_seconds": round(whole.seconds, 2),
        "arm_peak_rss_mb": round(whole.peak_rss / 2**20, 1),
    }
    return result, best_model
