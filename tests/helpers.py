"""Tiny HF models built from configs with fixed seeds (no download)."""

import torch
import transformers as tf

VOCAB = 96


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama; ``overrides`` change LlamaConfig fields (e.g. an even smaller one)."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**fields)).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = tf.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return tf.GPT2LMHeadModel(cfg).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 3, **overrides):
    """A 2-layer BERT classifier; ``overrides`` change BertConfig fields."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    fields.update(overrides)
    return tf.BertForSequenceClassification(tf.BertConfig(**fields)).eval()


def tiny_t5(seed: int = 0):
    torch.manual_seed(seed)
    cfg = tf.T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return tf.T5ForConditionalGeneration(cfg).eval()


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    cfg = tf.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        num_labels=5,
    )
    return tf.ViTForImageClassification(cfg).eval()


def inputs_for(name: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    ids = torch.randint(3, VOCAB, (2, 11), generator=gen)
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=gen)}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


BUILDERS = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert_classifier,
    "t5": tiny_t5,
    "vit": tiny_vit,
}


# Tolerances. Both paths read bit-identical weights (same rounding of z * lambda * sign into the
# activation dtype) and accumulate in fp32; they differ only in fp32 summation order and, for half
# activations, in the single final rounding of each output: up to one ulp of the output dtype
# (eps = 2**-7 for bf16, 2**-10 for fp16) relative, plus fp32 reordering noise. dz is fp32 in both.
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=2**-7),
    torch.float16: dict(rtol=2**-10, atol=2**-10),
}


def assert_close_scaled(actual, expected, dtype, name):
    """assert_close with atol relative to the tensor's magnitude (sums of ~50 unit-size terms)."""
    tol = TOLERANCE[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(
        actual.float(),
        expected.float(),
        rtol=tol["rtol"],
        atol=tol["atol"] * scale,
        msg=lambda m: f"{name}: {m}",
    )


def lm_losses(model, optimizer, ids, steps: int) -> list[float]:
    """``steps`` training steps of a causal LM on ``ids`` (labels = inputs) in train mode; the losses."""
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
