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


def matches_key(name: str, key: str, *, groups: bool = False) -> bool:
    """PEFT's rule for a name key: ``name`` equals ``key`` or ends in ``"." + key``, ``key`` being a regex that
    must match whole dotted components (as ``rank_pattern``'s keys). With ``groups``, ``key`` may also name a
    module that contains ``name``: ``"mlp"`` matches ``model.layers.0.mlp.up_proj``."""
    tail = r"(?:\..*)?" if groups else ""
    return re.fullmatch(rf"(?:.*\.)?(?:{key}){tail}", name) is not None


def _matches(name: str, pattern: str | list[str] | None) -> bool:
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(matches_key(name, re.escape(p)) for p in pattern)  # listed names: exact or suffix


def pattern_segments(
    names: list[str], pattern: dict[str, float] | None
) -> dict[str, tuple[float, list[str]]]:
    """``RoastConfig.compression_pattern`` resolved over the compressed modules ``names``: key -> (its
    compression, the names it claims), in pattern order. A module goes to the first key that matches it (or a
    module containing it, see :func:`matches_key`); modules no key matches are not listed (they share the
    pooled segment of z). A key that claims no module raises a ValueError naming it."""
    if not pattern:
        return {}
    claimed: dict[str, list[str]] = {key: [] for key in pattern}
    for name in names:
        key = next((k for k in pattern if matches_key(name, k, groups=True)), None)
        if key is not None:
            claimed[key].append(name)
    for key, owned in claimed.items():
        if owned:
            continue
        shadowed = [n for n in names if matches_key(n, key, groups=True)]
        if shadowed:
            raise ValueError(
                f"compression_pattern key {key!r} matches only modules that an earlier key already claims (the "
                f"first matching key wins), such as {shadowed[0]!r}: move it before that key, or drop it."
            )
        examples = ", ".join(repr(n) for n in names[:3])
        raise ValueError(
            f"compression_pattern key {key!r} matches no compressed module. A key matches a module whose full name, "
            f"or the name of a module containing it, equals the key or ends in '.' + key (a regex over whole name "
            f"components); the compressed modules are named like {examples}: fix the key or drop it."
        )
    return {key: (pattern[key], owned) for key, owned in claimed.items()}


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
