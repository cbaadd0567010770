"""Persistence: checkpoint folders (``folder``), their model card (``card``) and Hub transfer (``hub``).

The on-disk contract itself (names, keys, versions) is :mod:`hf_roast.checkpoint_format`; the transformers
integration that loads a folder through ``AutoModel*`` is :mod:`hf_roast.quantizer`.
"""
