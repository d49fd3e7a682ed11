"""Which implementation an op runs.

`THINKREC_KERNELS=auto` (default): Triton on CUDA tensors, the plain-PyTorch path on CPU.
`THINKREC_KERNELS=torch`: the PyTorch path everywhere.
`THINKREC_KERNELS=triton`: Triton everywhere; CPU tensors run under the Triton interpreter.

Triton decides between compiling and interpreting when a kernel is *decorated* (`@triton.jit` reads
`TRITON_INTERPRET` at import time), so the interpreter has to be switched on before any kernel module is
imported: `thinkrec_kernels/__init__.py` does that when THINKREC_KERNELS=triton is set and CUDA is absent, and
tests/conftest.py does it on machines without a GPU.

Every op makes the choice here, once per call, and then takes its `_TritonOps` or `_TorchOps` namespace: the
same launcher names, one set launching Triton kernels, the other running the PyTorch math.
"""

import os

import torch

_MODES = ("auto", "triton", "torch")
# dtypes the kernels take: every tl.dot and reduction accumulates in fp32. fp64 has no kernel: tl.dot of fp64
# returns fp64, which cannot be carried in the fp32 loop accumulator, so it does not compile for a GPU.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_mode() -> str:
    mode = os.environ.get("THINKREC_KERNELS", "auto").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"THINKREC_KERNELS={mode!r} is not one of {', '.join(_MODES)}")
    return mode


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the op should launch its Triton kernels on these tensors.

    tensors[0] is the op's main input, already in the dtype the op computes in: outside KERNEL_DTYPES (fp64)
    the op takes the PyTorch path whatever THINKREC_KERNELS says. Every tensor's device counts.
    """
    mode = kernel_mode()
    if mode == "torch" or tensors[0].dtype not in KERNEL_DTYPES:
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if mode == "auto":
        return on_cuda and not interpreting()
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "THINKREC_KERNELS=triton with CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing thinkrec_kernels (importing thinkrec_kernels with THINKREC_KERNELS=triton and no CUDA does it)"
        )
    return True
