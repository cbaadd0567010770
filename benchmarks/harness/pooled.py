"""The smaller model a user would build: the pre-trained embeddings and first k layers, mean-pooled, + a linear head.

BERT's sequence classifier reads the [CLS] position through its pooler. With no encoder layer (k = 0) that
position never sees the sentence, so the [CLS]-pooled 0-layer model can only learn the majority class: a broken
baseline. Averaging the unpadded tokens' last hidden states is what a user would do instead (a sentence-embedding
model's pooling; with k = 0 it is a bag of pre-trained token + position embeddings). The pooler is dropped, so
the model stores exactly the embeddings, the first k layers and the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPooledClassifier(nn.Module):
    """``encoder`` (an HF base model, e.g. ``BertModel`` without its pooler) -> mean over the tokens whose
    ``attention_mask`` is 1 -> dropout -> ``classifier``. Padding changes neither the mean nor (through the
    encoder's attention mask) the unpadded tokens' states, so a padded batch gives each sentence its own logits.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float, init_std: float):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # the Trainer and the harness read num_labels and friends from it
        self.dropout = nn.Dropout(dropout)
        # named like HF's head, so the target search (which excludes "classifier") leaves it dense
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=init_std)  # HF's init of a new head
        nn.init.zeros_(self.classifier.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        keep = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def mean_pooled(model: nn.Module) -> MeanPooledClassifier:
    """Turn a (truncated) ``XForSequenceClassification`` into a :class:`MeanPooledClassifier`: its base model
    without the pooler, and a fresh head of the same size and dropout as the one it replaces."""
    encoder = model.base_model
    if not hasattr(encoder, "pooler"):
        raise ValueError(
            f"{type(encoder).__name__} has no pooler to drop: mean pooling expects a BERT-like encoder."
        )
    encoder.pooler = None
    config = model.config
    dropout = getattr(config, "classifier_dropout", None)
    dropout = config.hidden_dropout_prob if dropout is None else dropout
    return MeanPooledClassifier(encoder, config.num_labels, dropout, config.initializer_range)
