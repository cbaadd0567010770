"""Jinja templates of the model cards hf_roast writes next to a checkpoint (package data, no code)."""
