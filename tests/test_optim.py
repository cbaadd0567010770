"""The fine-tuning recipe: create_roast_optimizer's groups and rates, and RoastTrainer end to end."""

import pytest
import torch
from helpers import VOCAB, tiny_bert_classifier, tiny_llama

import hf_roast
from hf_roast import RoastConfig, RoastRecipe, create_roast_optimizer, get_roast_model
from hf_roast.optim import (
    DEFAULT_HEAD_LR_RATIO,
    DEFAULT_UNCOMPRESSED_LR_RATIO,
    DEFAULT_Z_LR_RATIO,
    roast_parameter_groups,
    z_weight_multiplier,
)


def _classifier():
    return get_roast_model(tiny_bert_classifier(), RoastConfig(compression=4, exclude_modules=["classifier"]))


def _groups(optimizer):
    return {g["name"]: g for g in optimizer.param_groups}


def test_groups_cover_every_trainable_parameter_once_with_the_recipes_rates():
    model = _classifier()
    lr = 5e-5
    opt = create_roast_optimizer(model, lr, weight_decay=0.01)
    groups = _groups(opt)
    assert set(groups) == {"z", "uncompressed", "uncompressed_no_decay", "head", "head_no_decay"}
    grouped = [p for g in opt.param_groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)
    assert {id(p) for p in grouped} == trainable
    z = model.roast_store.z
    assert groups["z"]["params"] == [z]
    # z's rate is in weight units: lr * ratio / RMS(lambda), computed here from the plan independently
    modules = model.plan.modules
    rms = (sum(m.rows * m.cols * m.scale**2 for m in modules) / sum(m.rows * m.cols for m in modules)) ** 0.5
    assert groups["z"]["lr"] == pytest.approx(lr * DEFAULT_Z_LR_RATIO / rms)
    assert groups["uncompressed"]["lr"] == pytest.approx(lr * DEFAULT_UNCOMPRESSED_LR_RATIO)
    assert groups["head"]["lr"] == pytest.approx(lr * DEFAULT_HEAD_LR_RATIO)
    head = model.base_model.classifier
    assert {id(head.weight)} == {id(p) for p in groups["head"]["params"]}
    assert {id(head.bias)} == {id(p) for p in groups["head_no_decay"]["params"]}
    # no decay on z, biases or norms; the requested decay on the other matrices
    assert groups["z"]["weight_decay"] == 0.0
    assert groups["uncompressed_no_decay"]["weight_decay"] == 0.0
    assert groups["uncompressed"]["weight_decay"] == 0.01
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(
        n.endswith("bias") or "LayerNorm" in n
        for n in (names[id(p)] for p in groups["uncompressed_no_decay"]["params"])
    )
    assert any("word_embeddings" in names[id(p)] for p in groups["uncompressed"]["params"])


def test_custom_ratios_optimizer_class_and_frozen_parameters():
    model = _classifier()
    model.base_model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    opt = create_roast_optimizer(
        model,
        1e-4,
        torch.optim.SGD,
        z_lr_ratio=1.0,
        uncompressed_lr_ratio=3.0,
        head_lr_ratio=7.0,
        momentum=0.9,
    )
    assert isinstance(opt, torch.optim.SGD)
    groups = _groups(opt)
    assert groups["z"]["lr"] == pytest.approx(1e-4 * z_weight_multiplier(model))
    assert groups["uncompressed"]["lr"] == pytest.approx(3e-4)
    assert groups["head"]["lr"] == pytest.approx(7e-4)
    frozen = model.base_model.bert.embeddings.word_embeddings.weight
    assert all(p is not frozen for g in opt.param_groups for p in g["params"])


def test_language_model_without_a_head_gets_no_head_group():
    model = get_roast_model(tiny_llama(), RoastConfig(compression=8))
    groups = roast_parameter_groups(model, 1e-4)
    assert [g["name"] for g in groups] == ["z", "uncompressed", "uncompressed_no_decay"]


@pytest.mark.parametrize("bad", [0.0, -1e-4, float("inf"), float("nan")])
def test_bad_learning_rates_and_ratios_are_refused(bad):
    model = _classifier()
    with pytest.raises(ValueError, match="lr must be"):
        create_roast_optimizer(model, bad)
    with pytest.raises(ValueError, match="z_lr_ratio"):
        create_roast_optimizer(model, 1e-4, z_lr_ratio=bad)


def test_dense_model_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="get_roast_model"):
        create_roast_optimizer(tiny_bert_classifier(), 1e-4)


def _dataset(n=64, seed=0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, 12), generator=g)
    labels = (ids[:, 1] % 3).tolist()  # learnable from one token
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels})


def test_roast_trainer_builds_the_recipe_and_the_loss_falls(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _classifier()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        num_train_epochs=6,
        learning_rate=5e-4,
        weight_decay=0.01,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = hf_roast.RoastTrainer(model=model, args=args, train_dataset=_dataset())
    assert isinstance(trainer, Trainer)
    trainer.train()
    groups = _groups(trainer.optimizer)
    expected = create_roast_optimizer(model, 5e-4, weight_decay=0.01)
    # the optimizer's initial rates are the recipe's (the scheduler scales every group alike)
    assert {n: g["initial_lr"] for n, g in groups.items()} == pytest.approx(
        {g["name"]: g["lr"] for g in expected.param_groups}
    )
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


def test_roast_trainer_takes_a_recipe_and_keeps_a_users_optimizer(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, report_to=[], use_cpu=True)
    model = _classifier()
    trainer = hf_roast.RoastTrainer(model=model, args=args, roast_recipe=RoastRecipe(2.0, 5.0, 9.0))
    groups = _groups(trainer.create_optimizer())
    assert groups["uncompressed"]["lr"] == pytest.approx(5e-4)
    assert groups["head"]["lr"] == pytest.approx(9e-4)
    mine = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = hf_roast.RoastTrainer(model=model, args=args, optimizers=(mine, None))
    assert trainer.create_optimizer() is mine


def test_recipe_combines_with_the_distillation_trainer():
    from hf_roast.distill import DistillationTrainer
    from hf_roast.optim import roast_trainer_class

    cls = roast_trainer_class(DistillationTrainer)
    assert issubclass(cls, DistillationTrainer) and cls.__name__ == "RoastDistillationTrainer"
    assert roast_trainer_class(DistillationTrainer) is cls
    assert hf_roast.RoastDistillationTrainer is cls, "exported under the name it reports"
    with pytest.raises(TypeError, match="Trainer"):
        roast_trainer_class(torch.nn.Module)
