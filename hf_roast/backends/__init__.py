"""The execution paths of the ROAST ops, one module or subpackage per backend, and their front.

* :mod:`.dispatch`: the front; resolves the backend once per call and hands the call to one path;
* :mod:`.pytorch`: the PyTorch path, which runs every call;
* :mod:`.cpu`: the C++ kernel for inference on CPU, and the one-pass W build the PyTorch path uses on CPU;
* :mod:`.triton`: the fused Triton kernels.

Each backend has one contract: a gate that says why it cannot run a call (or None), and its ops. No backend
imports another, and nothing is imported here.
"""
