"""Module-balanced gradients on z (RoastConfig.module_balance, hf_roast.balance)."""

import math

import pytest
import torch
from helpers import VOCAB, lm_losses, tiny_llama

from hf_roast import RoastConfig, RoastModel, get_roast_model
from hf_roast.balance import BALANCE_BETA, balance_state, balanced, module_gradients


def _model(balance: bool, backend: str = "auto", embeddings: bool = False):
    config = RoastConfig(
        compression=4, init="random", module_balance=balance, compress_embeddings=embeddings, backend=backend
    )
    return get_roast_model(tiny_llama(seed=3), config)


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


def test_balanced_function_against_a_hand_computed_running_rms():
    state = balance_state(2)
    a = torch.tensor([3.0, 0.0, 4.0, 0.0])  # mean square over its 2 nonzero slots: 12.5
    out = balanced(a, state, 0)
    torch.testing.assert_close(out, a)  # the only module seen yet is its own reference
    b = torch.tensor([0.0, 0.5, 0.0, 0.0])  # mean square 0.25
    out = balanced(b, state, 1)
    ref = (math.sqrt(12.5) + 0.5) / 2
    torch.testing.assert_close(out, b * ref / 0.5)
    a2 = torch.tensor([1.0, 0.0, 1.0, 0.0])  # second step of module 0: running mean square, bias-corrected
    out = balanced(a2, state, 0)
    beta = BALANCE_BETA
    ms0 = ((1 - beta) * beta * 12.5 + (1 - beta) * 1.0) / (1 - beta**2)
    ref = (math.sqrt(ms0) + 0.5) / 2
    torch.testing.assert_close(out, a2 * ref / math.sqrt(ms0))
    assert state[1].tolist() == [2.0, 1.0]
    zero = balanced(torch.zeros(4), balance_state(1), 0)  # an all-zero dz stays zero, without NaN
    assert torch.equal(zero, torch.zeros(4))


@pytest.mark.parametrize("embeddings", [False, True])
def test_each_module_dz_is_scaled_to_the_common_rms_before_the_sum(embeddings):
    """Against per-module gradients taken independently: z.grad = sum_l dz_l * ref / rms_l, with the state seeded
    at this batch's own mean squares (a fixed point of the running mean, so the order modules are visited in
    backward does not matter). Scaling the summed dz instead would fail it: the factors differ by ~10x here."""
    ids = _ids(0)
    plain = _model(False, embeddings=embeddings)
    parts = module_gradients(plain, lambda: plain(input_ids=ids, labels=ids).loss)
    assert len(parts) == len(plain.plan.modules)
    mean_square = {n: g.pow(2).sum() / torch.count_nonzero(g) for n, g in parts.items()}
    rms = {n: ms.sqrt() for n, ms in mean_square.items()}
    ref = sum(rms.values()) / len(rms)
    assert max(rms.values()) / min(rms.values()) > 5, "modules' gradients should differ in size here"
    expected = sum(g * (ref / rms[n]) for n, g in parts.items())

    model = _model(True, embeddings=embeddings)
    store = model.roast_store
    with torch.no_grad():
        store.z.copy_(plain.roast_store.z)
    index = {spec.name: i for i, spec in enumerate(store.plan.modules)}
    state = balance_state(len(index))
    for name, ms in mean_square.items():
        state[0, index[name]] = ms * (1 - BALANCE_BETA**1000)
        state[1, index[name]] = 999
    store.grad_balance = state
    loss = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, plain(input_ids=ids, labels=ids).loss)  # an identity in the forward
    loss.backward()
    torch.testing.assert_close(store.z.grad, expected, rtol=1e-4, atol=1e-9)
    assert store.grad_balance[1].tolist() == [1000.0] * len(index)


def test_balance_is_off_by_default_and_idle_without_gradients():
    assert RoastConfig(compression=4).module_balance is False
    model = _model(True)
    with torch.no_grad():
        model(input_ids=_ids(1))
    model.eval()
    z = model.roast_store.z
    layer = model.base_model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        assert model.roast_store.balanced_z(z, layer.spec.name) is z
    assert model.roast_store.grad_balance.numel() == 0  # no state until a gradient flows
    with pytest.raises(ValueError, match="module_balance must be True or False"):
        RoastConfig(compression=4, module_balance="yes")


def test_torch_path_and_triton_kernels_get_the_same_balanced_gradient():
    pytest.importorskip("triton")
    ids = _ids(2)
    grads = []
    for backend in ("torch", "triton"):
        model = _model(True, backend=backend)
        for _ in range(2):  # the second step reads the running state the first one left
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.roast_store.z.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_training_with_balance_lowers_the_loss_and_the_flag_survives_save_and_load(tmp_path):
    model = _model(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = lm_losses(model, optimizer, _ids(4), steps=25)
    assert losses[-1] < 0.8 * losses[0]
    assert torch.all(model.roast_store.grad_balance[1] == 25)
    model.save_pretrained(tmp_path)
    loaded = RoastModel.from_pretrained(tmp_path)
    assert loaded.roast_config.module_balance is True and loaded.roast_store.module_balance is True


def test_module_gradients_split_z_grad_by_module():
    model = _model(False, embeddings=True)
    ids = _ids(5)
    parts = module_gradients(model, lambda: model(input_ids=ids, labels=ids).loss)
    assert model.roast_store.z.grad is None  # left untouched
    assert set(parts) == {spec.name for spec in model.plan.modules}
    model(input_ids=ids, labels=ids).loss.backward()
    grad = model.roast_store.z.grad
    # the same terms summed in another order: fp32 rounding relative to the gradient's scale, not each entry's
    torch.testing.assert_close(sum(parts.values()), grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item())
    assert model.roast_store._module_views is None  # layers read z directly again
    with pytest.raises(ValueError, match="get_roast_model"):
        module_gradients(tiny_llama(), lambda: None)
