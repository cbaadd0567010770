"""The execution paths of the ROAST ops (one subpackage or module per backend)."""
