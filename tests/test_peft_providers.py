"""bench/_peft_providers.py, the benchmark's peft peers, against ThinkRec's own scorer on a tiny random Llama:
the official per-user add_weighted_adapter + generate path equals our "linear" mix, peft's mixed
batches equal our exact mixture on one-hot rows (and "linear" on mixtures), padding changes nothing, and
the peft copy's base weights are lm's bit for bit."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.train_fixtures import PAD, YES, sample_set, tiny_lm
from thinkrec.model.lora import LoRALinear
from thinkrec.batches import cf_inputs, collate, yes_logits, yes_positions

pytest.importorskip("peft")

_spec = importlib.util.spec_from_file_location(
    "_peft_providers", Path(__file__).resolve().parents[1] / "bench" / "_peft_providers.py")
pp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pp)

# per-user adapter weights (E = 3: global, expert_1, expert_2): one-hot ones and dense mixtures
USER_WEIGHTS = [
    [1.0, 0.0, 0.0],  # global
    [0.0, 1.0, 0.0],  # expert_1
    [0.0, 0.0, 1.0],  # expert_2
    [0.2, 0.5, 0.3],  # mixture of all three
    [0.0, 0.6, 0.4],  # mixture of two experts (zero weight dropped from add_weighted_adapter)
    [0.1, 0.0, 0.9],
]


@pytest.fixture(scope="module")
def setup():
    lm = tiny_lm(layers=2, n_experts=2, cf_dim=5).eval()
    sset = sample_set(14, ids=True, seed=3)
    samples = [sset.sample(i) for i in range(len(sset))]
    users = np.asarray(sset.users)
    assert len(set(users.tolist())) >= 5  # several users, so one-hot and mixture users both occur
    weights = np.array([USER_WEIGHTS[u] for u in users], dtype=np.float64)
    g = torch.Generator().manual_seed(7)
    user_emb, item_emb = torch.randn(6, 5, generator=g), torch.randn(11, 5, generator=g)
    pm = pp.to_peft(lm)
    return lm, pm, samples, users, weights, user_emb, item_emb


def _ours(lm, samples, users, weights, user_emb, item_emb, mix):
    """Our scorer: one padded batch of all rows, per-row weights, Yes logit at the prompt's last position."""
    layers = list(lm.lora_layers().values())
    old = layers[0].mix
    for m in layers:
        m.mix = mix
    try:
        b = collate(samples, users, PAD)
        cf = cf_inputs(b, user_emb, item_emb)
        with torch.no_grad():
            h = lm(b.input_ids, b.attention_mask, cf_embeds=cf, placeholder_mask=b.ph_mask, select=yes_positions(b),
                   expert_weights=torch.as_tensor(weights, dtype=torch.float32))
        return yes_logits(h, lm.lm_head_weight, YES, b.yes_col).double().numpy()
    finally:
        for m in layers:
            m.mix = old


def _is_mixture(weights):
    return np.array([pp._one_adapter(w) is None for w in weights])


def test_to_peft_base_weights_are_bit_exact(setup):
    lm, pm, *_ = setup
    ours = dict(lm.llm.named_parameters())
    n_base = n_lora = 0
    for name, p in pm.base_model.model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        key = name.replace(".base_layer.", ".")  # peft wraps target linears: q_proj.base_layer.weight
        assert torch.equal(p, ours[key]) and p.dtype == ours[key].dtype, name
        n_base += ".base_layer." in name
    assert n_base == len(lm.lora_layers())
    names = lm.adapter_names
    for path, mod in lm.lora_layers().items():
        target = pm.base_model.model.get_submodule(path)
        assert not isinstance(target, LoRALinear)
        for e, name in enumerate(names):
            assert torch.equal(target.lora_A[name].weight, mod.lora_A[e])
            assert torch.equal(target.lora_B[name].weight, mod.lora_B[e])
            assert target.scaling[name] == mod.scale
            n_lora += 1
    assert n_lora == len(names) * len(lm.lora_layers())
    assert all(isinstance(m, LoRALinear) for m in lm.lora_layers().values())  # lm untouched
    assert not pm.training and not any(p.requires_grad for p in pm.parameters())


def test_official_scores_equal_ours_linear(setup):
    lm, pm, samples, users, weights, ue, ie = setup
    before = set(pm.peft_config)
    got = pp.official_scores(pm, lm, samples, users, weights, ue, ie, PAD, batch_size=2, max_new_tokens=3)
    assert got.dtype == np.float64 and got.shape == (len(samples),)
    assert set(pm.peft_config) == before  # temporary weighted adapters were deleted
    want = _ours(lm, samples, users, weights, ue, ie, "linear")
    mix = _is_mixture(weights)
    assert mix.any() and (~mix).any()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # one-hot users: "linear" and "delta" coincide; mixtures: they differ, so the check above means something
    delta = _ours(lm, samples, users, weights, ue, ie, "delta")
    np.testing.assert_allclose(got[~mix], delta[~mix], atol=1e-4, rtol=0)
    assert np.abs(got[mix] - delta[mix]).max() > 1e-3


def test_official_scores_do_not_depend_on_padding(setup):
    """generate with inputs_embeds and left padding: positions come from the mask, so a padded row's score
    equals the same row scored alone."""
    lm, pm, samples, users, weights, ue, ie = setup
    single = pp.official_scores(pm, lm, samples, users, weights, ue, ie, PAD, batch_size=1, max_new_tokens=1)
    seen = []  # RoPE hides a constant position shift, so also check the prefill's position ids directly
    hook = pm.base_model.model.model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append((kw["position_ids"], kw["attention_mask"])), with_kwargs=True)
    try:
        padded = pp.official_scores(pm, lm, samples, users, weights, ue, ie, PAD, batch_size=4, max_new_tokens=1)
    finally:
        hook.remove()
    assert len({len(s.input_ids) for s in samples}) > 1  # batches really are padded
    np.testing.assert_allclose(padded, single, atol=1e-5, rtol=0)
    n_padded = 0
    for pos, mask in seen:  # generate drops an all-ones mask
        if mask is None:
            mask = torch.ones_like(pos)
        real = mask.bool()
        n_padded += int((~real).any())
        want = mask.cumsum(-1) - 1
        assert torch.equal(pos[real], want[real])  # positions count real tokens only
    assert n_padded > 0


def test_peft_mixed_scores_equal_ours(setup):
    lm, pm, samples, users, weights, ue, ie = setup
    names = pp.prepare_mixtures(pm, lm, weights)
    mix = _is_mixture(weights)
    assert [n for n, m in zip(names, mix) if not m] == [lm.adapter_names[int(np.argmax(w))] for w in weights[~mix]]
    assert len({n for n, m in zip(names, mix) if m}) == len({tuple(w) for w in weights[mix]})  # one per mixture
    n_adapters = len(pm.peft_config)
    assert pp.prepare_mixtures(pm, lm, weights) == names and len(pm.peft_config) == n_adapters  # reused
    got = pp.peft_mixed_scores(pm, lm, samples, users, weights, ue, ie, PAD, batch_size=16, adapter_names=names)
    assert got.dtype == np.float64 and got.shape == (len(samples),)
    delta = _ours(lm, samples, users, weights, ue, ie, "delta")
    linear = _ours(lm, samples, users, weights, ue, ie, "linear")
    np.testing.assert_allclose(got[~mix], delta[~mix], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[mix], linear[mix], atol=1e-4, rtol=0)
    # padding: each row alone, and batches of 3 (different padding) give the same scores
    alone = pp.peft_mixed_scores(pm, lm, samples, users, weights, ue, ie, PAD, batch_size=1, adapter_names=names)
    threes = pp.peft_mixed_scores(pm, lm, samples, users, weights, ue, ie, PAD, batch_size=3)
    np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(threes, alone, atol=1e-5, rtol=0)

