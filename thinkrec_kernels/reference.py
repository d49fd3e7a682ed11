"""Plain-PyTorch references for every op, written the obvious way.

Tests compare the kernels against these in float64; benches import them as the `reference` provider.
Nothing here is tuned: clarity first.
"""

import torch
import torch.nn.functional as F


def lora_mix(x, A, B, w, scale):
    """delta[m] = scale * sum_e w[m, e] * B_e @ (A_e @ x[m]).

    x: [..., K], A: [E, r, K], B: [E, N, r], w: [..., E] -> [..., N]
    """
    xa = torch.einsum("...k,erk->...er", x, A)  # [..., E, r]
    return scale * torch.einsum("...er,enr->...n", xa * w[..., None], B)


def lora_mix_linear(x, A, B, w, scale):
    """peft's "linear" adapter combination per row, as the official code used it:

    delta[m] = scale * (sum_e sqrt(w[m, e]) B_e) @ (sum_e sqrt(w[m, e]) A_e) @ x[m]
    (cross terms B_i A_j included). Weights must be >= 0.
    """
    sw = w.sqrt()
    A_mix = torch.einsum("...e,erk->...rk", sw, A)  # [..., r, K]
    B_mix = torch.einsum("...e,enr->...nr", sw, B)  # [..., N, r]
    xa = torch.einsum("...rk,...k->...r", A_mix, x)
    return scale * torch.einsum("...nr,...r->...n", B_mix, xa)


def lora_linear(x, weight, bias, A, B, w, scale):
    """Base linear plus the weighted LoRA delta. weight: [N, K], bias: [N] or None."""
    return F.linear(x, weight, bias) + lora_mix(x, A, B, w, scale)


def yes_head_bce(h, lm_weight, token_id, labels, reduction="mean"):
    """logits = h @ lm_weight[token_id]; loss = BCE-with-logits(logits, labels).

    h: [M, D], lm_weight: [V, D], labels: [M] in {0, 1} -> (loss, logits [M])
    """
    logits = h @ lm_weight[token_id]
    loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction=reduction)
    return loss, logits


def linear_cross_entropy(h, weight, targets, ignore_index=-100, reduction="mean"):
    """F.cross_entropy(h @ weight.T, targets) with full logits; an all-ignored batch gives 0.

    h: [T, D], weight: [V, D], targets: [T]
    """
    logits = h @ weight.T
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    if reduction == "mean" and not (targets != ignore_index).any():
        return logits.sum() * 0.0  # mean over no tokens: 0 with zero gradients, not NaN
    return loss
