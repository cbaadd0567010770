"""The front of the backends (hf_roast/backends/dispatch.py): the config's ``backend`` means what it says.

``backend="torch"``, in the config or set on the store later, runs no native code at all: neither the CPU
backend's fused GEMV nor its W build, whatever the call (forward, backward, ``generate()``, materialising
a weight, merging), exactly as ``HF_ROAST_BACKEND=torch`` does. These tests need no C++ compiler: every
entry point of the CPU backend is replaced by one that fails.
"""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, tiny_llama

from hf_roast import RoastConfig, get_roast_model
from hf_roast.backends import dispatch
from hf_roast.backends.cpu import build as cpu_build
from hf_roast.backends.cpu import ops as cpu


class _NoNativeCode(cpu_build.Library):
    """A kernel library that must never be loaded (the loader is where native code enters the process)."""

    def load(self):
        raise AssertionError("the CPU kernel library was loaded under backend='torch'")


@pytest.fixture
def no_native_code(monkeypatch):
    """Every entry point of the CPU backend (its gate, its ops, its loader) fails the test if called."""

    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"hf_roast.backends.cpu.ops.{name} ran under backend='torch'")

        return call

    for name in ("unsupported_reason", "cpu_roast_linear", "build_weight", "dequantize"):
        monkeypatch.setattr(cpu, name, forbidden(name))
    monkeypatch.setattr(cpu_build, "library", _NoNativeCode())
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)


def _exercise(model) -> None:
    """Forward with gradients, backward, decode through generate(), a weight and a merge: every op."""
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert model.roast_store.z.grad is not None and model.roast_store.z.grad.abs().sum() > 0
    with torch.no_grad():
        tokens = model.generate(ids[:1, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, 7)
    layer = model.model.layers[0].mlp.up_proj
    assert torch.isfinite(layer.materialize_weight()).all()
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, out.logits.detach(), rtol=1e-4, atol=1e-4)


def test_backend_torch_in_the_config_runs_no_native_code(no_native_code):
    model = get_roast_model(tiny_llama(), RoastConfig(compression=4.0, tile=(16, 16), backend="torch"))
    assert model.roast_store.backend == "torch"
    _exercise(model)


def test_backend_torch_set_on_the_store_runs_no_native_code(no_native_code, monkeypatch):
    model = get_roast_model(tiny_llama(), RoastConfig(compression=4.0, tile=(16, 16)))
    model.roast_store.backend = "torch"
    _exercise(model)


def test_the_environment_overrides_the_config_once_per_call(monkeypatch):
    """``HF_ROAST_BACKEND`` wins over the config's value, and an unknown value names its source."""
    monkeypatch.setenv(dispatch.ENV_BACKEND, "torch")
    assert dispatch.requested_backend("cpu") == "torch"
    assert dispatch.native_weight(dispatch.requested_backend("auto"), torch.device("cpu")) is None
    monkeypatch.delenv(dispatch.ENV_BACKEND)
    assert dispatch.requested_backend("") == "auto"
    assert dispatch.native_weight("torch", torch.device("cpu")) is None
    assert dispatch.native_weight("triton", torch.device("cpu")) is None
    assert dispatch.native_weight("auto", torch.device("meta")) is None
    assert dispatch.native_weight("auto", torch.device("cpu")) is not None
    with pytest.raises(ValueError, match="backend='gpu'"):
        dispatch.requested_backend("gpu")
