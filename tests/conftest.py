import os

import torch

# Without a GPU, run Triton kernels in Triton's CPU interpreter; this must happen before any
# kernel module is imported (triton.jit reads it when the kernels are defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
