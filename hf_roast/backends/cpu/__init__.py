"""The CPU backend: a C++ kernel for inference on CPU, and a one-pass W build for the PyTorch backend.

* ``roast_cpu.cpp``: the kernel, and ``roast_cpu_op.cpp``: its torch ops (CPU kernels in C++), package data;
* :mod:`.translate`: the mapping and quantisation formulas translated from Python to C for it;
* :mod:`.build`: the constants the kernel shares with Python, the compiler, the cache and the loader, which
  registers the ops' CPU kernels;
* :mod:`.ops`: the backend's contract, its one gate (``unsupported_reason``) and its ops.

Nothing is imported or compiled here: the kernel is built on first use.
"""
