"""Training-time integrations a user reaches for: half-precision models, gradient checkpointing."""

import torch
from helpers import inputs_for, tiny_llama

from hf_roast import RoastConfig, get_roast_model


def test_bf16_model_trains_with_fp32_z():
    rm = get_roast_model(tiny_llama().to(torch.bfloat16), RoastConfig(compression=4.0, tile=(16, 16)))
    assert rm.roast_store.z.dtype == torch.float32
    ids = inputs_for("llama")["input_ids"]
    rm.train()
    out = rm(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grad = rm.roast_store.z.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = inputs_for("llama")["input_ids"]
    grads = []
    for checkpointing in (False, True):
        rm = get_roast_model(tiny_llama(), RoastConfig(compression=4.0, tile=(16, 16)))
        rm.train()
        if checkpointing:
            rm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert rm.base_model.is_activation_checkpointing
        rm(input_ids=ids, labels=ids).loss.backward()
        grads.append(rm.roast_store.z.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
