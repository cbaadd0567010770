"""The CPU backend: a C++ kernel for inference on CPU, and a one-pass W build for the PyTorch backend.

* ``roast_cpu.cpp``: the kernel, package data;
* :mod:`.translate`: the mapping and quantisation formulas translated from Python to C for it;
* :mod:`.build`: the compiler, the cache, the ctypes loader and its struct-layout check;
* :mod:`.ops`: the backend's contract, its one gate (``unsupported_reason``) and its ops.

Nothing is imported or compiled here: the kernel is built on first use.
"""
