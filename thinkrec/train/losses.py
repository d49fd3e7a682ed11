"""The training objective on hidden states, through the kernels (no [B, T, V] logits anywhere).

For a batch of B rows (a shard of a global batch of n_rows rows with n_tokens answer tokens):

    z_b   = h[b, yes_col_b] . W[yes]                                  Yes logit, [B]
    BCE   = sum_b bce(z_b, y_b) / n_rows                              thinkrec_kernels.yes_head_bce
    LM    = sum_{answer tokens (b, t)} CE(W h[b, t], a_{b, t}) / n_tokens   thinkrec_kernels.linear_cross_entropy
    loss  = c_bce * BCE + c_lm * LM,   (c_bce, c_lm) = (0.9, 0.1) plain, (0.1, 0.9) reasoning

h: [B, T, D] final hidden states, W: [V, D] the frozen LM head. A step draws either a plain or a
reasoning batch (probability 0.2 for reasoning, see loop.py), so the weights are per batch; LM is the
mean over the batch's answer tokens, as the Hugging Face loss of the official code (batch size 1 there).
"""

import torch

from thinkrec.batches import yes_positions
from thinkrec_kernels import linear_cross_entropy, yes_head_bce

PLAIN_WEIGHTS = (0.9, 0.1)  # (BCE, LM) for Yes/No samples
REASONING_WEIGHTS = (0.1, 0.9)  # for samples whose answer is a reasoning trace


def loss_weights(reasoning: bool):
    return REASONING_WEIGHTS if reasoning else PLAIN_WEIGHTS


def loss_positions(batch):
    """(rows, cols) of the states the loss reads: the B Yes positions, then the answer positions. Passed
    as the model's `select`, so the forward returns only these [B + N_ans, D] (and prunes its last layer)."""
    rows, cols = yes_positions(batch)
    return torch.cat([rows, batch.ans_row]), torch.cat([cols, batch.ans_col])


def batch_loss(h: torch.Tensor, lm_head: torch.Tensor, yes_id: int, batch):
    """(loss scalar, parts {"bce", "lm"} as floats of this shard, Yes logits [B] detached).

    h: the states at loss_positions(batch) [B + N_ans, D], or all hidden states [B, T, D]."""
    c_bce, c_lm = loss_weights(batch.reasoning)
    if h.dim() == 3:
        h = h[loss_positions(batch)]
    B = len(batch.yes_col)
    # the kernels take matching dtypes and run their own precision policy, so leave autocast here
    with torch.autocast(h.device.type, enabled=False):
        h = h.to(lm_head.dtype)
        bce_sum, logits = yes_head_bce(h[:B], lm_head, yes_id, batch.labels, reduction="sum")
        ce_sum = linear_cross_entropy(h[B:], lm_head, batch.ans_target, reduction="sum")
    bce = bce_sum / batch.n_rows
    lm = ce_sum / max(batch.n_tokens, 1)
    loss = c_bce * bce + c_lm * lm
    return loss, {"bce": float(bce.detach()), "lm": float(lm.detach())}, logits.detach()
