"""Knowledge distillation from a dense teacher, as a recovery option for any compressed arm.

A compressed model (hf-roast, pruned, truncated) starts below its dense parent. Matching the dense
fine-tuned teacher's soft predictions gives it a richer signal per example than the hard labels alone
(Hinton et al., 2015); optionally also matching hidden states (TinyBERT-style) when the widths agree.

``DistillationTrainer`` is a drop-in ``transformers.Trainer``: pass ``teacher=`` and train as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by T^2 (keeps gradients comparable).

    ``mask`` (same leading shape as the logits without the class axis) selects the positions that count,
    e.g. the non-padding tokens of a language model.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "the teacher must share the student's label space / vocabulary."
        )
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    if mask is not None:
        mask = mask.to(per_position.dtype)
        return (per_position * mask).sum() / mask.sum().clamp_min(1) * temperature**2
    return per_position.mean() * temperature**2


def hidden_state_loss(student_hidden, teacher_hidden, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between paired hidden states (last ``len(student)`` layers of the teacher).

    A truncated student has fewer layers: it is paired with the teacher's *last* layers, which is where
    the task-specific features live.
    """
    pairs = list(zip(student_hidden, teacher_hidden[len(teacher_hidden) - len(student_hidden) :]))
    if not pairs:
        raise ValueError("hidden-state distillation needs hidden states from both student and teacher.")
    losses = []
    for s, t in pairs:
        if s.shape != t.shape:
            raise ValueError(
                f"hidden states {tuple(s.shape)} vs {tuple(t.shape)}: widths must match to distil them."
            )
        err = (s.float() - t.float()).pow(2).mean(-1)
        if mask is not None:
            m = mask.to(err.dtype)
            losses.append((err * m).sum() / m.sum().clamp_min(1))
        else:
            losses.append(err.mean())
    return torch.stack(losses).mean()


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose loss mixes the task loss with distillation from a frozen dense ``teacher``.

    loss = (1 - alpha) * task_loss + alpha * KL_T(teacher || student) [+ hidden_weight * hidden MSE]

    Works with any student the Trainer accepts (a ``RoastModel``, a pruned or truncated model): it only
    needs logits with the teacher's shape. The teacher is put in eval mode, frozen, and moved to the
    student's device.
    """

    def __init__(
        self,
        *args,
        teacher: nn.Module,
        alpha: float = 0.5,
        temperature: float = 2.0,
        hidden_weight: float = 0.0,
        **kwargs,
    ):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must be in [0, 1] (0: task loss only, 1: distillation only).")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0.")
        if hidden_weight < 0:
            raise ValueError(f"hidden_weight={hidden_weight} must be >= 0.")
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha, self.temperature, self.hidden_weight = alpha, temperature, hidden_weight
        self._teacher_on_device = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._teacher_on_device:
            self.teacher.to(next(model.parameters()).device)
            self._teacher_on_device = True
        want_hidden = self.hidden_weight > 0
        extra = {"output_hidden_states": True} if want_hidden else {}
        outputs = model(**inputs, **extra)
        task_loss = outputs.loss
        with torch.no_grad():
            teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            teacher_out = self.teacher(**teacher_inputs, **extra)
        mask = self._position_mask(inputs, outputs.logits)
        kd = distillation_loss(outputs.logits, teacher_out.logits, self.temperature, mask)
        loss = kd if task_loss is None else (1 - self.alpha) * task_loss + self.alpha * kd
        if want_hidden:
            loss = loss + self.hidden_weight * hidden_state_loss(
                outputs.hidden_states, teacher_out.hidden_states, inputs.get("attention_mask")
            )
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _position_mask(inputs, logits: torch.Tensor):
        """Token-level logits (LMs) count only attended positions; sequence-level logits need no mask."""
        attention = inputs.get("attention_mask")
        if logits.dim() == 3 and attention is not None and attention.shape == logits.shape[:2]:
            return attention
        return None


__all__ = ["DistillationTrainer", "distillation_loss", "hidden_state_loss"]
