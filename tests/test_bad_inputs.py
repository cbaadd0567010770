"""Bad input at run time gets a clear error that names the problem and the fix."""

import pytest
import torch
from helpers import inputs_for, tiny_llama

from hf_roast import RoastConfig, get_roast_model


def test_inputs_of_the_wrong_width_dtype_or_device_get_clear_errors():
    rm = get_roast_model(tiny_llama(), RoastConfig(compression=4.0, tile=(16, 16), compress_embeddings=True))
    q = dict(rm.roast_layers())["model.layers.0.self_attn.q_proj"]
    emb = dict(rm.roast_layers())["model.embed_tokens"]
    with pytest.raises(ValueError, match="q_proj: the input's last dimension is 65.*in_features=64"):
        q(torch.randn(2, 3, 65))
    with pytest.raises(TypeError, match="q_proj: the input has dtype torch.int64"):
        q(torch.ones(2, 3, 64, dtype=torch.int64))
    with pytest.raises(TypeError, match="token ids must be an integer tensor"):
        emb(torch.ones(1, 2))
    for ids in ([[5, 96]], [[-1]]):  # would read other rows of z
        with pytest.raises(RuntimeError, match=r"embed_tokens: token ids must lie in \[0, 96\)"):
            emb(torch.tensor(ids))
    rm.to("meta")  # z on another device than the inputs
    with pytest.raises((ValueError, RuntimeError), match="meta"):
        q(torch.randn(2, 3, 64))


def test_a_dtype_the_kernels_do_not_support_says_why(monkeypatch):
    monkeypatch.setenv("HF_ROAST_BACKEND", "triton")
    rm = get_roast_model(tiny_llama(), RoastConfig(compression=4.0, tile=(16, 16))).to(torch.float64)
    with pytest.raises(RuntimeError, match="cannot run.*float64"):
        rm(**inputs_for("llama"))


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_an_invalid_regex_is_a_config_error_naming_the_field(field):
    with pytest.raises(ValueError, match=f"{field}='\\(' is not a valid regular expression"):
        RoastConfig(**{field: "("})
