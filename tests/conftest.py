import os

import torch

# Without a GPU, Triton kernels run under the interpreter; @triton.jit reads this when kernel modules are
# imported, so it is set before any test module imports kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
