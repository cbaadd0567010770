"""Session-wide test setup.

Without a GPU the Triton kernels run on CPU through the Triton interpreter, which ``triton.jit`` picks
at decoration time: TRITON_INTERPRET=1 must be set before any test module imports the kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
