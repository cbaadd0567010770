"""Hub access for compressed checkpoints, through ``huggingface_hub`` only.

Downloads take only what a checkpoint needs (configs, safetensors, tokenizer files), never a dense
copy; uploads send exactly the folder ``save_pretrained`` writes, model card included.
"""

from __future__ import annotations

import os
import tempfile

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt", "*.model", "*.jinja", "tokenizer*"]


def download_checkpoint(
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> str:
    """Download (or find in the HF cache; ``HF_HUB_OFFLINE=1`` works) a checkpoint; returns the local folder."""
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
        allow_patterns=CHECKPOINT_PATTERNS,
    )


def push_checkpoint(
    roast_model,
    repo_id: str,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    **save_kwargs,
):
    """Save ``roast_model`` into a temporary folder and upload that folder as one commit.

    The card is the one ``save_pretrained`` writes: nothing on this path generates transformers' default
    card. Returns huggingface_hub's ``CommitInfo``.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
    with tempfile.TemporaryDirectory(prefix="hf_roast_push_") as folder:
        roast_model.save_pretrained(folder, repo_id=repo_id, **save_kwargs)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload ROAST-compressed model with hf-roast",
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
