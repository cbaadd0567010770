"""STABLE-RPS's stability claim: 32x sharing from a random init trains without NaN or inf, every scaler."""

import pytest
import torch
from helpers import tiny_llama

from hf_roast import RoastConfig, create_roast_optimizer, get_roast_model

README_LR = 5e-5  # the learning rate of the README's fine-tuning example


@pytest.mark.parametrize("scaler", ["v5", "v1", "none"])
def test_200_steps_at_32x_from_random_init_stay_finite(scaler):
    torch.manual_seed(0)
    model = get_roast_model(
        tiny_llama(
            hidden_size=32,
            intermediate_size=48,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_hidden_layers=1,
        ),
        RoastConfig(compression=32.0, init="random", scaler=scaler, tile=(8, 8)),
    ).train()
    optimizer = create_roast_optimizer(model, lr=README_LR)
    gen = torch.Generator().manual_seed(0)
    pattern = torch.randint(3, 96, (16,), generator=gen)
    losses = []
    for step in range(200):
        shift = int(torch.randint(0, 16, (1,), generator=gen))
        ids = pattern.roll(shift).repeat(2, 1)  # a repeating sequence: learnable, so the loss moves
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss), f"step {step}: loss {loss}"
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(torch.isfinite(g).all() for g in grads), f"step {step}: a gradient is not finite"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert torch.isfinite(model.roast_store.z).all()
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20, "the model learned nothing in 200 steps"
