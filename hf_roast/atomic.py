"""Atomic checkpoint folders: a save that dies halfway leaves the previous checkpoint intact.

The new checkpoint is written into a temporary folder beside the target, then renamed into place. Files
and folders of the old target that the save does not write itself (a tokenizer, a Trainer's
``checkpoint-*`` folders, ``optimizer.pt``...) are carried over by hard links (copies where the file
system has none), so a save never loses them either; stale weight files are not carried, as
transformers deletes them on save too.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator

STALE_WEIGHTS = re.compile(
    r".*\.safetensors|.*\.safetensors\.index\.json|pytorch_model.*\.bin(\.index\.json)?"
)
"""Weight files a new save replaces: never carried over from the old folder."""


def _link_tree(source: str, destination: str) -> None:
    """Recreate ``source`` at ``destination`` with hard links (copies where links are unsupported)."""
    if os.path.isdir(source) and not os.path.islink(source):
        os.makedirs(destination, exist_ok=True)
        for name in os.listdir(source):
            _link_tree(os.path.join(source, name), os.path.join(destination, name))
        return
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def _folder_mode(target: str) -> int:
    if os.path.isdir(target):
        return stat.S_IMODE(os.stat(target).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder to write the new ``target`` into; on success it replaces ``target``.

    On an exception the temporary folder is removed and ``target`` is untouched. The swap is two renames
    (old target aside, new folder in), so no reader ever sees a half-written checkpoint.
    """
    target = os.path.abspath(os.fspath(target))
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"{target} exists and is not a folder: save_pretrained writes a folder.")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
    os.chmod(staging, _folder_mode(target))  # mkdtemp makes it private (0700); a checkpoint is not
    try:
        yield staging
        if os.path.isdir(target):
            for entry in os.listdir(target):
                if not os.path.lexists(os.path.join(staging, entry)) and not STALE_WEIGHTS.fullmatch(entry):
                    _link_tree(os.path.join(target, entry), os.path.join(staging, entry))
            retired = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(target, os.path.join(retired, name))
            os.rename(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
