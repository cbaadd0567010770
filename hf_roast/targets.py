"""Which modules to compress, with PEFT's target-matching semantics."""

from __future__ import annotations

import re

from torch import nn

try:  # GPT-2 style projections store their weight transposed
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()


def module_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d', 'embedding', or None for modules hf_roast cannot compress."""
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def _matches(name: str, pattern: str | list[str] | None) -> bool:
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def find_targets(model: nn.Module, config) -> list[tuple[str, nn.Module, str]]:
    """(name, module, kind) of every module to compress, in ``named_modules`` order (the mapping order)."""
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: list[tuple[str, nn.Module, str]] = []
    linear_names: list[str] = []
    for name, module in model.named_modules():
        kind = module_kind(module)
        if kind is None or not name:
            continue
        if kind != "embedding":
            linear_names.append(name)
        if _matches(name, config.exclude_modules):
            continue
        if kind == "embedding":
            if config.compress_embeddings:
                found.append((name, module, kind))
            continue
        target = config.target_modules
        if target == "all-linear":
            if module is not output_layer:
                found.append((name, module, kind))
        elif target is not None and _matches(name, target):
            found.append((name, module, kind))
    if not found:
        suffixes = sorted({n.split(".")[-1] for n in linear_names})
        raise ValueError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) matched no "
            f"module of {type(model).__name__}. Its linear modules end in: {suffixes}. Use one of those names, "
            "a regex that matches full module names, or 'all-linear'."
        )
    return found
