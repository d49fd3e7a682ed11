"""Stage 3: the frozen prefix (merged, no autograd) gives the full model's hidden states and gradients,
layers below the trainable ones get no gradient, and each row trains only its own group's expert."""

import torch

from tests.train_fixtures import PAD, YES, sample_set, tiny_lm
from thinkrec.train import stages
from thinkrec.experts import one_hot_experts
from thinkrec.batches import cf_inputs, collate
from thinkrec.train.losses import batch_loss


def _batch(lm, idx=(0, 1, 2, 3, 4, 5, 6)):
    sset = sample_set(16, ids=True, seed=5)
    b = collate([sset.sample(i) for i in idx], sset.users[list(idx)], PAD)
    g = torch.Generator().manual_seed(0)
    cf = cf_inputs(b, torch.randn(6, 5, generator=g), torch.randn(11, 5, generator=g))
    return b, cf


def _grads(lm, fwd, b, cf, groups):
    lm.zero_grad(set_to_none=True)
    h = fwd(b.input_ids, b.attention_mask, cf_embeds=cf, placeholder_mask=b.ph_mask,
            expert_weights=one_hot_experts(groups, lm.n_experts))
    loss, _, _ = batch_loss(h, lm.lm_head_weight, YES, b)
    loss.backward()
    return h.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad and p.grad is not None}


def test_frozen_prefix_matches_full_forward_and_trains_only_top_experts():
    torch.manual_seed(0)
    lm = tiny_lm(layers=5, n_experts=3, cf_dim=5)
    prefix = stages.setup(lm, "stage3", expert_layers=2)  # layers 3, 4 train; 0..2 frozen and merged
    assert prefix.split == 3 and len(prefix.merged) == 2 * 3
    b, cf = _batch(lm)
    groups = torch.tensor([0, 2, 2, 1, 0, 2, 1])
    h_full, g_full = _grads(lm, lm, b, cf, groups)
    h_pre, g_pre = _grads(lm, prefix, b, cf, groups)
    torch.testing.assert_close(h_pre, h_full, atol=2e-5, rtol=1e-4)
    assert g_pre.keys() == g_full.keys()
    for n in g_full:
        torch.testing.assert_close(g_pre[n], g_full[n], atol=1e-5, rtol=1e-4, msg=n)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert all(".layers.3." in n or ".layers.4." in n for n in trainable)
    assert not any(".lora_A.0" in n or ".lora_B.0" in n for n in trainable)  # global adapter frozen
    assert all(p.grad is None for n, p in lm.named_parameters() if n not in trainable)  # nothing below / frozen
    # B of expert e gets a gradient iff some row is routed to e: group 0..2 -> adapters 1..3
    lm.zero_grad(set_to_none=True)
    _, g_two = _grads(lm, prefix, b, cf, torch.tensor([0, 2, 2, 0, 0, 2, 0]))
    assert any(".lora_B.1" in n and g.abs().sum() > 0 for n, g in g_two.items())
    assert all(g.abs().sum() == 0 for n, g in g_two.items() if ".lora_B.2" in n or ".lora_A.2" in n)


def test_prefix_forward_never_touches_the_model():
    lm = tiny_lm(layers=4, n_experts=2, cf_dim=5)
    prefix = stages.setup(lm, "stage3", expert_layers=1)
    modules = dict(lm.named_modules())
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    b, cf = _batch(lm, (1, 4, 9))
    prefix(b.input_ids, b.attention_mask, cf_embeds=cf, placeholder_mask=b.ph_mask)
    after = dict(lm.named_modules())
    assert after.keys() == modules.keys() and all(after[k] is m for k, m in modules.items())
    assert all(torch.equal(v, state[k]) for k, v in lm.state_dict().items())
    assert all(m not in modules.values() for m in prefix.merged.values())  # the prefix owns its merged copies


def test_prefix_cache_reuses_rows_across_batches_and_padding():
    lm = tiny_lm(layers=4, n_experts=2, cf_dim=5)
    prefix = stages.setup(lm, "stage3", expert_layers=1, prefix_cache_mb=1.0)
    b1, cf1 = _batch(lm, (2, 4, 9))
    with torch.no_grad():
        fresh = prefix(b1.input_ids, b1.attention_mask, cf_embeds=cf1, placeholder_mask=b1.ph_mask,
                       expert_weights=one_hot_experts(torch.tensor([0, 1, 1]), lm.n_experts))
    # the same rows again, now padded inside a batch with a longer row: cached prefix, same outputs
    b2, cf2 = _batch(lm, (9, 2, 4, 11))
    keys = [("plain", int(r)) for r in b2.rows]
    w2 = one_hot_experts(torch.tensor([1, 0, 1, 0]), lm.n_experts)
    with torch.no_grad():
        prefix(b2.input_ids, b2.attention_mask, cf_embeds=cf2, placeholder_mask=b2.ph_mask, expert_weights=w2,
               keys=keys)  # fills
        assert prefix.misses == 3 + 4 and prefix.hits == 0 and len(prefix.cache) == 4
        again = prefix(b2.input_ids, b2.attention_mask, cf_embeds=cf2, placeholder_mask=b2.ph_mask, expert_weights=w2,
                       keys=keys)
    assert prefix.hits == 4
    T1, T2 = b1.input_ids.shape[1], b2.input_ids.shape[1]
    for r1, r2 in ((0, 1), (1, 2), (2, 0)):  # rows 2, 4, 9 in both batches
        n = int(b1.attention_mask[r1].sum())
        torch.testing.assert_close(again[r2, T2 - n:], fresh[r1, T1 - n:], atol=2e-5, rtol=1e-4)
