"""ThinkRec's Triton ops, each with a plain-PyTorch path for CPUs.

- `lora_mix` / `lora_linear` (thinkrec_kernels/lora.py): per-row weighted multi-expert LoRA, forward and backward.
- `yes_head_bce` (thinkrec_kernels/yes_head.py): BCE on the "Yes" logit without touching the rest of the vocabulary.
- `linear_cross_entropy` (thinkrec_kernels/linear_ce.py): chunked token cross-entropy of `h @ W.T`, never holding
  full logits.
- `cpu_attention.packed_causal_attention`: causal attention over packed rows, bf16 forward and backward on
  oneDNN's brgemm on CPUs; `dropout.philox_dropout`: dropout whose mask is Philox4x32-10 of (seed, index),
  regenerated in the backward. Both run C++ (thinkrec_kernels/cpu/, compiled at first use by _cpu_ext.py;
  SDPA and the plain-torch Philox stream where it cannot build). Imported from their modules, not here, so
  importing the package compiles nothing.

Dispatch: see `thinkrec_kernels/_dispatch.py` (`THINKREC_KERNELS=auto|triton|torch`). Module names differ from the
functions they export, so `thinkrec_kernels.lora_mix` is always the function.
"""

import os as _os
import sys as _sys
import warnings as _warnings

import torch as _torch

# @triton.jit picks interpreter or compiler at decoration time, so this must precede the op imports.
if _os.environ.get("THINKREC_KERNELS", "auto").strip().lower() == "triton" and not _torch.cuda.is_available():
    if "triton" not in _sys.modules:
        _os.environ.setdefault("TRITON_INTERPRET", "1")
    elif _os.environ.get("TRITON_INTERPRET", "0") != "1":
        # triton.language's own @jit helpers (tl.zeros, ...) were already made compile-only, and the
        # interpreter cannot call them: switching it on now would fail inside every kernel with "Cannot call
        # @triton.jit'd outside of the scope of a kernel". Leave it off; use_triton() then says what to do.
        _warnings.warn("thinkrec_kernels: THINKREC_KERNELS=triton without CUDA needs TRITON_INTERPRET=1 in the "
                       "environment when triton is imported before thinkrec_kernels (it was)", stacklevel=2)

from thinkrec_kernels._dispatch import kernel_mode, use_triton  # noqa: E402
from thinkrec_kernels.linear_ce import linear_cross_entropy  # noqa: E402
from thinkrec_kernels.lora import lora_linear, lora_mix  # noqa: E402
from thinkrec_kernels.yes_head import yes_head_bce  # noqa: E402

__all__ = ["kernel_mode", "use_triton", "lora_mix", "lora_linear", "yes_head_bce", "linear_cross_entropy"]
