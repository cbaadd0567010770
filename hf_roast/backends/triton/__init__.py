"""The Triton execution path: fused ROAST kernels, their ``torch.library`` ops and the availability probe.

Nothing is imported here: ``available`` must load without triton, and the kernels compile on first use.
"""
