"""Run from the root of a clone, transformers must find Hugging Face's ``kernels`` package, not ours.

transformers (5.25 and later) imports Hugging Face's kernel-hub package ``kernels``. ``python -m pytest``,
``python -c``, a script or a notebook started at the repo root put the root first on ``sys.path``, so any
importable ``kernels`` there (as the Triton folder once was) hides the real one and breaks the ``Trainer``
and ``from_pretrained``. The check runs in a fresh interpreter started exactly that way.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, pathlib, sys
import torch
import kernels
from transformers import Trainer  # noqa: F401
import transformers.integrations.hub_kernels  # noqa: F401
from hf_roast.backends import custom_ops  # defines the hf_roast:: ops
from hf_roast.backends.triton import ops  # registers their CUDA kernels
import hf_roast.backends.triton.ops  # a second import must not register them again
print(json.dumps({
    "kernels_file": str(pathlib.Path(kernels.__file__).resolve()),
    "schemas": {name: len(torch._C._jit_get_schemas_for_operator(f"hf_roast::{name}")) for name in custom_ops.SCHEMAS},
}))
"""


def _hugging_face_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_no_top_level_kernels_module_in_the_repo():
    shadows = [p.name for p in (ROOT / "kernels", ROOT / "kernels.py") if p.exists()]
    assert not shadows, f"{shadows} at the repo root would hide Hugging Face's `kernels` package"


@pytest.mark.skipif(not _hugging_face_kernels_installed(), reason="Hugging Face's kernels is not installed")
def test_transformers_imports_hugging_faces_kernels_from_the_repo_root():
    pytest.importorskip("triton")
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    kernels_file = Path(found["kernels_file"])
    assert ROOT not in kernels_file.parents, f"`import kernels` from the repo root found {kernels_file}"
    assert found["schemas"] and set(found["schemas"].values()) == {1}, found["schemas"]
