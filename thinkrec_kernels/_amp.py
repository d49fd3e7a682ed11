"""Autocast policy of the ops: cast once at the op's entry, then run with autocast off.

Left to autocast, the PyTorch ops inside an autograd Function (addmm, mm, g @ weight) would be re-cast one by
one while the Triton kernels ran in the inputs' dtype: lora_linear's base addmm came out bf16 while the LoRA
kernels ran in fp32, and its backward then failed on `g @ weight` with mismatched dtypes.
"""

import contextlib

import torch

_AUTOCAST_FLOATS = (torch.float16, torch.bfloat16, torch.float32)  # autocast leaves fp64 alone


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op on x computes in: autocast's when autocast is on for x's device and x is a 16/32-bit
    float (what F.linear would compute in), else x's own dtype."""
    dev = x.device.type
    if x.dtype in _AUTOCAST_FLOATS and torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def no_autocast(t: torch.Tensor):
    """A context with autocast off for t's device (a no-op context where autocast does not exist)."""
    dev = t.device.type
    if torch.amp.is_autocast_available(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()
