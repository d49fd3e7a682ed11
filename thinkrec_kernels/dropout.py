"""Dropout with a counter-based mask: Philox4x32-10 of (seed, element index), one seed drawn from torch's generator
per call. The backward regenerates the mask from the seed, so nothing is saved between forward and backward, and
the mask does not depend on the thread count or on how the work is split.

    y = philox_dropout(x, p)          # training; x * keep * scale, keep = 16 hashed bits >= round(p * 65536)

p is rounded to a multiple of 1/65536 (0.05 -> 0.0500031), scale = 1 / (1 - that p). The seed is one
`torch.randint` draw from the default CPU generator, so `torch.manual_seed` and a restored generator state
(kill-and-resume) give the same masks.

On a CPU the C++ kernel (thinkrec_kernels/cpu/dropout.cpp) hashes and scales in one pass; `THINKREC_KERNELS=torch`,
other devices and machines where it cannot be built run `philox_keep`, the same stream in plain torch ops, so
the masks are the same bits either way (tests/test_dropout.py).
"""

import math

import torch

from thinkrec_kernels import _cpu_ext
from thinkrec_kernels._dispatch import kernel_mode

M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers (Salmon et al., SC'11; Random123)
W0, W1 = 0x9E3779B9, 0xBB67AE85  # key bumps
_U32 = 0xFFFFFFFF


def philox4x32_10(ctr: torch.Tensor, key: tuple) -> torch.Tensor:
    """Philox4x32-10 of counters ctr [n, 4] (int64 holding uint32 words) under key (k0, k1) -> [n, 4] words.
    int64 products of two uint32 wrap modulo 2^64, which keeps the low 64 bits exact: hi and lo words are right."""
    c0, c1, c2, c3 = ctr.unbind(1)
    k0, k1 = key[0] & _U32, key[1] & _U32
    for _ in range(10):
        p0, p1 = c0 * M0, c2 * M1
        c0, c1, c2, c3 = ((p1 >> 32) & _U32) ^ c1 ^ k0, p1 & _U32, ((p0 >> 32) & _U32) ^ c3 ^ k1, p0 & _U32
        k0, k1 = (k0 + W0) & _U32, (k1 + W1) & _U32
    return torch.stack([c0, c1, c2, c3], 1)


def philox_keep(shape, seed: int, cut: int, device=None) -> torch.Tensor:
    """The keep mask [shape] bool of `philox_dropout` with this seed. Block b = Philox4x32-10((b, b >> 32, 0, 0),
    (seed, seed >> 32)) gives eight 16-bit values (each word's low half, then its high half); element
    e = 64 g + 8 j + l takes value j of block 8 g + l, and keeps when it is >= cut."""
    n = math.prod(shape)
    groups = (n + 63) // 64
    b = torch.arange(groups * 8, dtype=torch.int64, device=device)
    zero = torch.zeros_like(b)
    words = philox4x32_10(torch.stack([b & _U32, b >> 32, zero, zero], 1), (seed & _U32, (seed >> 32) & _U32))
    values = torch.stack([words & 0xFFFF, words >> 16], -1).view(groups, 8, 8)  # [group, lane, value]
    return (values.transpose(1, 2).flatten()[:n] >= cut).view(shape)


def threshold(p: float) -> tuple:
    """(cut, scale) for drop probability p: keep when a 16-bit value >= cut = round(p * 65536)."""
    cut = min(max(round(p * 65536), 0), 65536)
    return cut, (65536 / (65536 - cut) if cut < 65536 else 0.0)


def draw_seed() -> int:
    """One 63-bit seed from torch's default CPU generator (a manual_seed or a restored state replays it)."""
    return int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64))


def _apply(x: torch.Tensor, seed: int, cut: int, scale: float) -> torch.Tensor:
    ext = _cpu_ext.load() if x.device.type == "cpu" and kernel_mode() != "torch" else False
    if ext and x.dtype in (torch.bfloat16, torch.float32, torch.float64):
        return ext.philox_dropout(x, seed, cut, scale)
    return x * philox_keep(x.shape, seed, cut, x.device) * scale


class _PhiloxDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed: int, cut: int, scale: float):
        ctx.args = (seed, cut, scale)
        return _apply(x, seed, cut, scale)

    @staticmethod
    def backward(ctx, g):
        return _apply(g, *ctx.args), None, None, None


def philox_dropout(x: torch.Tensor, p: float, seed: int = None) -> torch.Tensor:
    """Training-mode dropout of x with probability p (see the module docstring); seed None draws one."""
    cut, scale = threshold(p)
    if cut == 0:
        return x
    if cut == 65536:
        return x * 0
    return _PhiloxDropout.apply(x, draw_seed() if seed is None else seed, cut, scale)
