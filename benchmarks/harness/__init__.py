"""The memory-accuracy evaluation of hf-roast against magnitude pruning and smaller models.

- ``data``: pinned real weights and text (sha256-checked), splits, the offline cache.
- ``baselines``: magnitude pruning with a fixed mask at hf-roast's budget, truncated smaller models.
- ``arms``: what one arm is, how its model is built, how its storage is counted.
- ``classification`` / ``language_model``: the two experiments; ``experiments``: the named sweeps.
- ``results``: per-arm JSON, the aggregate JSON, markdown tables, plots, and the target checks.

Entry point: ``python -m benchmarks.evaluate`` from the root of a clone (``benchmarks/evaluate.py``).
"""
