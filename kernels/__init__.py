"""Triton kernels for ROAST (installed as ``hf_roast.kernels``). No import-time side effects here."""
