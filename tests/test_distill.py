"""DistillationTrainer: the loss is the documented mix, it trains any arm, and bad settings are refused."""

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from hf_roast import DistillationTrainer, RoastConfig, get_roast_model
from hf_roast.distill import distillation_loss, hidden_state_loss


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


def test_distillation_loss_matches_kl_definition():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    temperature = 3.0
    expected = (
        nn.functional.kl_div(
            nn.functional.log_softmax(s / temperature, -1),
            nn.functional.log_softmax(t / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )
    assert torch.allclose(distillation_loss(s, t, temperature), expected, atol=1e-6)
    assert distillation_loss(t, t, temperature).abs() < 1e-6


def test_distillation_loss_masks_positions():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    garbage = s.clone()
    garbage[0, 2] += 100.0
    garbage[1, 1:] -= 100.0  # masked positions must not count
    assert torch.allclose(distillation_loss(s, t, 2.0, mask), distillation_loss(garbage, t, 2.0, mask))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="label space"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 4))


def test_hidden_state_loss_pairs_last_teacher_layers():
    a, b, c = (torch.full((1, 2, 4), v) for v in (0.0, 1.0, 3.0))
    # a 1-layer student is paired with the teacher's last layer only
    assert hidden_state_loss([b], [a, c]).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="widths"):
        hidden_state_loss([torch.zeros(1, 2, 3)], [a])


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(5, 50, (4, 6))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 1])}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_trainer_loss_is_the_documented_mix(tmp_path, alpha):
    teacher, student = tiny_bert(0), tiny_bert(1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = DistillationTrainer(model=student, args=args, teacher=teacher, alpha=alpha, temperature=2.0)
    batch = _batch()
    student.eval()
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        task = student(**batch).loss
        kd = distillation_loss(
            student(**{k: v for k, v in batch.items() if k != "labels"}).logits,
            teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits,
            2.0,
        )
    assert math.isclose(loss.item(), ((1 - alpha) * task + alpha * kd).item(), rel_tol=1e-5, abs_tol=1e-6)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_trainer_distils_a_roast_student_with_hidden_states(tmp_path):
    from datasets import Dataset

    teacher = tiny_bert(0).eval()
    student = get_roast_model(
        tiny_bert(1), RoastConfig(compression=4, tile=(8, 8), exclude_modules=["classifier"])
    )
    batch = _batch()
    data = Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        num_train_epochs=4,
        learning_rate=3e-3,
        per_device_train_batch_size=4,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=data, teacher=teacher, alpha=1.0, hidden_weight=1.0
    )

    def kd_now():
        with torch.no_grad():
            return trainer.compute_loss(student.eval(), batch).item()

    before = kd_now()
    z_before = student.roast_store.z.detach().clone()
    trainer.train()
    assert not torch.equal(z_before, student.roast_store.z.detach()), "the shared array z was not trained"
    assert kd_now() < before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"temperature": 0}, "temperature"),
        ({"hidden_weight": -1}, "hidden_weight"),
    ],
)
def test_bad_settings_are_refused(tmp_path, kwargs, match):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(model=tiny_bert(), args=args, teacher=tiny_bert(), **kwargs)
