"""Command-line entry points (installed as ``hf_roast.scripts``); each module has a ``main(argv)``."""
