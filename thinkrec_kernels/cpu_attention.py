"""Causal self-attention over packed rows on a CPU in bf16, forward and backward on oneDNN's brgemm.

SDPA on a CPU runs attention on the padded [B, H, L, d] grid (the packed rows copied there and back); its bf16
backward is no faster than fp32 (cpublas::gemm, not brgemm), ~25% of a stage-1 step (docs/architecture.md).
`thinkrec_kernels/cpu/attention.cpp` is FlashAttention-2's forward (online softmax, which also gives the
backward its log-sum-exp) and backward tiled in 64 x 64 blocks on brgemm with fp32 accumulators, over the
packed rows (no padding). The forward serves training and scoring (no autograd needed).

    if packed_attention_available(q):
        o = packed_causal_attention(q, k, v, cu, scale)   # q [N, H, d], k, v [N, G, d] -> [N, H, d]

The C++ is compiled at first use (thinkrec_kernels/_cpu_ext.py). Where it cannot build, oneDNN cannot run
bf16 brgemm on this CPU, the head dim is not a multiple of 16, `THINKREC_KERNELS=torch` or
`THINKREC_CPU_ATTENTION=0`, `packed_attention_available` is False and callers keep SDPA.
"""

import os
import warnings

import torch

from thinkrec_kernels import _cpu_ext
from thinkrec_kernels._dispatch import kernel_mode

_ext = None  # the C++ module where it built and oneDNN runs bf16 brgemm on this CPU, else False; None: not asked


def _load():
    global _ext
    if _ext is None:
        ext = _cpu_ext.load()
        _ext = ext if ext and ext.brgemm_bf16_available() else False
    return _ext


_head_dims: dict[int, bool] = {}  # head dim -> whether the kernel ran on it here (oneDNN packs multiples of 16)


def _runs_with(d: int) -> bool:
    if d not in _head_dims:
        ok = d % 16 == 0
        if ok:
            try:  # two rows (5 and 70 tokens: a partial tile and a second one), two query heads on one kv head
                q, k = torch.randn(75, 2, d, dtype=torch.bfloat16), torch.randn(75, 1, d, dtype=torch.bfloat16)
                cu = torch.tensor([0, 5, 75])
                o, lse = _load().attention_fwd(q, k, k, cu, 0.1)
                _load().attention_bwd(q, k, k, o, q, lse, cu, 0.1)
            except RuntimeError as e:
                warnings.warn(f"thinkrec_kernels: the CPU attention kernels failed on head dim {d} ({e}); SDPA "
                              f"runs instead", stacklevel=3)
                ok = False
        _head_dims[d] = ok
    return _head_dims[d]


def packed_attention_available(q: torch.Tensor) -> bool:
    """True when packed_causal_attention should run for q [N, H, d]: a bf16 CPU tensor, the C++ builds here and
    runs on head dim d, THINKREC_KERNELS is not `torch` and THINKREC_CPU_ATTENTION is not 0 (the switch that
    puts SDPA back, for comparisons)."""
    if (q.device.type != "cpu" or q.dtype != torch.bfloat16 or kernel_mode() == "torch"
            or os.environ.get("THINKREC_CPU_ATTENTION", "1") == "0"):
        return False
    return bool(_load()) and _runs_with(q.shape[-1])


def to_grid(x: torch.Tensor, slot: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """Packed [N, H, d] -> the [B, H, L, d] attention grid (token i at flat place slot[i] of [B * L]; zeros
    elsewhere): SDPA's layout here and in thinkrec/model/packed.py."""
    return x.new_zeros(B * L, *x.shape[1:]).index_copy(0, slot, x).view(B, L, *x.shape[1:]).transpose(1, 2)


class _PackedCausal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, scale: float):
        o, lse = _load().attention_fwd(q, k, v, cu, scale)
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu = ctx.saved_tensors
        dq, dk, dv = _load().attention_bwd(q, k, v, o, do.contiguous(), lse, cu, ctx.scale)
        return dq, dk, dv, None, None


def packed_causal_attention(q, k, v, cu, scale: float) -> torch.Tensor:
    """Causal attention of each packed row with itself. q [N, H, d]; k, v [N, G, d] (G divides H); the tokens
    of row b are packed rows cu[b] .. cu[b + 1] (cu [B + 1] int64). -> o [N, H, d]. bf16 CPU tensors; check
    packed_attention_available first."""
    return _PackedCausal.apply(q, k, v, cu, float(scale))
