"""The HF Trainer trains a RoastModel: columns, labels, metrics, falling loss; compressed checkpoints,
exact resume, best-model loading."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import VOCAB, lm_losses, tiny_bert_classifier, tiny_llama
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from hf_roast import RoastConfig, get_roast_model


def classification_data(n: int, seed: int) -> Dataset:
    """Label 1 iff token 7 occurs: learnable in a few dozen steps by a tiny BERT."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, VOCAB, size=(n, 12))
    labels = rng.integers(0, 2, size=n)
    ids[labels == 1, rng.integers(1, 12, size=int(labels.sum()))] = 7
    ids[:, 0] = 3
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": np.ones_like(ids).tolist(),
            "label": labels.tolist(),
            "text": ["unused column the Trainer must drop"] * n,
        }
    )


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}


def test_trainer_with_default_arguments_reports_metrics_and_loss_falls(tmp_path):
    rm = get_roast_model(tiny_bert_classifier(num_labels=2), RoastConfig(compression=4.0, tile=(16, 16)))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=6,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        logging_steps=5,
        report_to=[],
        save_strategy="no",
        seed=0,
    )
    trainer = Trainer(
        model=rm,
        args=args,
        train_dataset=classification_data(256, 0),
        eval_dataset=classification_data(128, 1),
        compute_metrics=accuracy,
    )
    assert trainer.label_names == ["labels"]
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    # compute_metrics saw labels: input_ids and label survived column dropping
    assert "eval_accuracy" in after
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0]
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_accuracy"] > 0.8


def sgd_losses(scaler: str, lr: float, steps: int = 8) -> list[float]:
    torch.manual_seed(0)
    rm = get_roast_model(tiny_llama(), RoastConfig(compression=4.0, tile=(16, 16), scaler=scaler))
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    return lm_losses(rm, torch.optim.SGD(rm.parameters(), lr=lr), ids, steps)


def test_gradient_scaler_keeps_sgd_stable_where_plain_sharing_diverges():
    """STABLE-RPS's claim (§3.2): with the v5 scaler a step size that blows up plain sharing still converges."""
    stable = sgd_losses("v5", lr=1.0)
    plain = sgd_losses("none", lr=1.0)
    assert all(b < a for a, b in zip(stable, stable[1:])) and stable[-1] < 1.0
    assert plain[-1] > min(plain) + 1.0  # diverged


def test_causal_lm_sgd_steps_reduce_loss_without_scaler_at_a_small_step():
    losses = sgd_losses("none", lr=0.2)
    assert losses[-1] < losses[0] - 1.0


# ---- checkpoints, resume, best model --------------------------------------------------------------------
def lm_data(n: int, seed: int) -> Dataset:
    ids = np.random.default_rng(seed).integers(3, VOCAB, size=(n, 16))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def checkpointing_trainer(output_dir, **overrides) -> Trainer:
    """6 steps, a checkpoint and an evaluation every 3. Attention dropout makes the losses depend on the
    RNG state too, so an exact resume needs the data order, optimizer, scheduler and RNG all restored."""
    rm = get_roast_model(tiny_llama(attention_dropout=0.1), RoastConfig(compression=4.0, tile=(16, 16)))
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        save_steps=3,
        eval_strategy="steps",
        eval_steps=3,
        report_to=[],
        seed=0,
        use_cpu=True,
        **overrides,
    )
    return Trainer(model=rm, args=args, train_dataset=lm_data(64, 0), eval_dataset=lm_data(16, 1))


def train_losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def checkpoint_z(folder) -> torch.Tensor:
    return load_file(str(folder / "model.safetensors"))["base_model.roast_store.z"]


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """An uninterrupted run that keeps its best checkpoint. "Best" is the *highest* eval loss, so that the
    model loaded at the end (checkpoint-3) differs from the last one and loading it is observable."""
    out = tmp_path_factory.mktemp("run")
    trainer = checkpointing_trainer(
        out, load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True
    )
    trainer.train()
    return out, trainer


def test_save_steps_checkpoints_are_compressed(checkpointed_run):
    out, trainer = checkpointed_run
    rm = trainer.model
    plan = rm.roast_store.plan
    stored = rm.compression_report()["model"]["stored_parameters"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    for folder in out.glob("checkpoint-*"):
        state = load_file(str(folder / "model.safetensors"))
        assert [k for k, t in state.items() if t.numel() == plan.num_slots] == ["base_model.roast_store.z"]
        assert not [k for k in state for s in plan.modules if k.endswith(f"{s.name}.weight")]
        assert sum(t.numel() for t in state.values()) == stored  # nothing dense beyond what the model stores
        # The optimizer state is as small: one moment pair per stored tensor, none W-sized.
        moments = torch.load(folder / "optimizer.pt", weights_only=True)["state"].values()
        assert sum(s["exp_avg"].numel() for s in moments) == stored


def test_resume_from_checkpoint_continues_exactly(checkpointed_run, tmp_path):
    out, uninterrupted = checkpointed_run
    resumed = checkpointing_trainer(out)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert resumed.state.global_step == 6
    losses = train_losses(uninterrupted)
    assert len(losses) == 6 and len(set(losses)) == 6  # the run moved (and dropout made steps differ)
    assert (
        train_losses(resumed) == losses
    )  # steps 1-3 restored from the checkpoint, 4-6 recomputed: bit-equal
    assert torch.equal(resumed.model.roast_store.z.detach(), checkpoint_z(out / "checkpoint-6"))


def test_load_best_model_at_end_loads_the_best_checkpoint(checkpointed_run):
    out, trainer = checkpointed_run
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-3")
    z = trainer.model.roast_store.z.detach()
    assert torch.equal(z, checkpoint_z(out / "checkpoint-3"))
    assert not torch.equal(z, checkpoint_z(out / "checkpoint-6"))
    # The layers read the loaded z (not a stale copy): the reloaded model evaluates as checkpoint-3 did.
    step3 = next(h["eval_loss"] for h in trainer.state.log_history if h.get("step") == 3 and "eval_loss" in h)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(step3, rel=1e-6)


def test_trainer_bf16_runs_the_model_in_bf16_with_an_fp32_master_z(tmp_path):
    """``TrainingArguments(bf16=True)`` on CPU: autocast runs the ROAST matmuls in bf16, z stays fp32."""
    from hf_roast import RoastTrainer

    rm = get_roast_model(tiny_llama(), RoastConfig(compression=4.0, tile=(16, 16)))
    seen = []
    layer = dict(rm.roast_layers())["model.layers.0.mlp.up_proj"]
    layer.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, report_to=[], use_cpu=True, bf16=True, save_strategy="no",
    )  # fmt: skip
    trainer = RoastTrainer(model=rm, args=args, train_dataset=lm_data(32, 0))
    trainer.train()
    assert torch.bfloat16 in seen
    z = rm.roast_store.z
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert trainer.optimizer.state[z]["exp_avg"].dtype == torch.float32
    assert all(np.isfinite(loss) for loss in train_losses(trainer))
