"""Golden test: training steps through our kernels give the losses of a plain reference (torch LoRA via
forward hooks, full [B, T, V] logits, F.binary_cross_entropy_with_logits and F.cross_entropy)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.train_fixtures import PAD, YES, sample_set, tiny_lm
from thinkrec.batches import collate
from thinkrec.train.losses import batch_loss


def _reference_model(lm):
    """A plain HF copy of lm's base model with the global LoRA added by forward hooks: y += s (x A^T) B^T."""
    ref = copy.deepcopy(lm.llm)
    loras = {}
    for path, mod in lm.lora_layers().items():
        lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(mod.weight)
        A = torch.nn.Parameter(mod.lora_A[0].detach().clone())
        B = torch.nn.Parameter(mod.lora_B[0].detach().clone())
        lin.register_forward_hook(lambda m, inp, out, A=A, B=B, s=mod.scale: out + s * (inp[0] @ A.T) @ B.T)
        parent, _, child = path.rpartition(".")
        setattr(ref.get_submodule(parent), child, lin)
        loras[path] = (A, B)
    ref.requires_grad_(False)
    for A, B in loras.values():
        A.requires_grad_(True)
        B.requires_grad_(True)
    return ref, loras


def _reference_loss(ref, batch):
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits  # [B,T,V]
    rows = torch.arange(len(batch.labels))
    bce = F.binary_cross_entropy_with_logits(logits[rows, batch.yes_col, YES], batch.labels)
    targets = torch.full(batch.input_ids.shape, -100, dtype=torch.long)
    targets[batch.ans_row, batch.ans_col] = batch.ans_target
    lm_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    c_bce, c_lm = (0.1, 0.9) if batch.reasoning else (0.9, 0.1)
    return c_bce * bce + c_lm * lm_loss


@pytest.mark.parametrize("reasoning", [False, True])
def test_losses_match_reference_over_steps(reasoning):
    torch.manual_seed(0)
    lm = tiny_lm(layers=2, n_experts=1)
    lm.set_trainable(adapters=[0])
    ref, loras = _reference_model(lm)
    ours = [p for p in lm.parameters() if p.requires_grad]
    theirs = [t for A, B in loras.values() for t in (A, B)]
    opt_a = torch.optim.AdamW(ours, lr=1e-2, weight_decay=1e-3)
    opt_b = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=1e-3)
    sset = sample_set(24, traces=reasoning, seed=3)
    for step, idx in enumerate([[0, 5, 7], [1, 2, 3, 4, 6], [8, 9, 10, 11, 12, 13, 14]]):  # odd batch sizes
        batch = collate([sset.sample(i) for i in idx], sset.users[idx], PAD, reasoning)
        loss_a, _, _ = batch_loss(lm(batch.input_ids, batch.attention_mask), lm.lm_head_weight, YES, batch)
        loss_b = _reference_loss(ref, batch)
        assert abs(loss_a.item() - loss_b.item()) < 1e-5 * max(1.0, abs(loss_b.item())), (step, loss_a, loss_b)
        for opt, loss in ((opt_a, loss_a), (opt_b, loss_b)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    for path, mod in lm.lora_layers().items():  # the trained adapters agree too
        A, B = loras[path]
        torch.testing.assert_close(mod.lora_A[0], A, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mod.lora_B[0], B, atol=1e-5, rtol=1e-4)


def test_collate_positions():
    sset = sample_set(8, ids=True, traces=True)
    samples = [sset.sample(i) for i in (0, 3, 5)]
    b = collate(samples, sset.users[[0, 3, 5]], PAD, reasoning=True)
    T = b.input_ids.shape[1]
    assert T == max(len(s.input_ids) + len(s.answer_ids) - 1 for s in samples)
    for r, s in enumerate(samples):
        o = T - (len(s.input_ids) + len(s.answer_ids) - 1)
        assert b.attention_mask[r, :o].sum() == 0 and b.attention_mask[r, o:].all()
        assert b.yes_col[r] == o + len(s.input_ids) - 1
        # the answer tokens sit right after their predicting positions (teacher forcing)
        cols = b.ans_col[b.ans_row == r]
        assert np.array_equal(b.ans_target[b.ans_row == r].numpy(), s.answer_ids)
        assert np.array_equal(b.input_ids[r, cols[1:]].numpy(), s.answer_ids[:-1])
        assert b.ph_mask[r].nonzero().flatten().tolist() == (o + s.ph_pos).tolist()
    assert b.n_rows == 3 and b.n_tokens == sum(len(s.answer_ids) for s in samples)
