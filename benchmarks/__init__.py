"""The research harness of hf-roast: the experiments behind the results in docs/results.md.

Not part of the wheel. Run it from the root of a clone (``python -m benchmarks.evaluate``); see
benchmarks/README.md.
"""
