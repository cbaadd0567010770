"""Hub access for compressed checkpoints (downloads by repo id)."""

from __future__ import annotations


def download_checkpoint(repo_id: str, revision: str | None = None, token=None, cache_dir=None, **_) -> str:
    """Download (or find in the HF cache) the files of a compressed checkpoint; returns the local folder."""
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        allow_patterns=["*.json", "*.safetensors", "*.md", "*.txt", "*.model", "tokenizer*"],
    )
