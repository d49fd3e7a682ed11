"""The KV-cached forward (thinkrec/model/cached.py) and generation (thinkrec/model/generate.py) against the
full padding-free forward `lm(...)`: prefill, chunked extends, the shared-prefix mode, and greedy decoding
without a cache, for the Llama, Qwen2 (biases) and Qwen3 (q/k norms, head_dim 24) layouts, with CF slots
and rows of different adapter mixtures (global, one expert, a mixture)."""

import pytest
import torch

from tests.test_model_packed import _tiny
from tests.tiny_llama import VOCAB
from tests.train_fixtures import ITEM_PH, PAD, USER_PH
from thinkrec.model.cached import KVCache, extend, prefill
from thinkrec.model.generate import generate
from thinkrec_kernels.cpu_attention import packed_attention_available

pytestmark = pytest.mark.smoke  # .ci/newest runs this module on the newest dependency versions

KINDS = ["llama", "qwen2", "qwen3"]
W3 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.2, 0.5, 0.3]])  # global, expert 2, a mixture
TOL = dict(atol=1e-5, rtol=1e-4)


def _lm(kind):
    return _tiny(kind).eval()


def _prompts(lens, seed=0, slots=((0, 2, USER_PH), (2, 5, ITEM_PH), (2, 1, USER_PH))):
    """Right-padded random prompts [B, T] with CF placeholders at (row, col), and cf_embeds [P, 5]."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    T = int(lens.max())
    ids = torch.randint(10, VOCAB, (len(lens), T), generator=g)
    ids[torch.arange(T) >= lens[:, None]] = PAD
    for r, c, ph in slots:
        if r < len(lens) and c < lens[r]:
            ids[r, c] = ph
    n = int(((ids == USER_PH) | (ids == ITEM_PH)).sum())
    return ids, lens, torch.randn(n, 5, generator=g)


def _mask(lens, T):
    return (torch.arange(T) < torch.as_tensor(lens)[:, None]).long()


def _is_ph(ids):
    return (ids == USER_PH) | (ids == ITEM_PH)


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_matches_full_forward(kind):
    lm = _lm(kind)
    ids, lens, cf = _prompts([7, 4, 9])
    mask = _mask(lens, ids.shape[1])
    with torch.no_grad():
        ref = lm(ids, mask, cf_embeds=cf, expert_weights=W3)
        swapped = lm(ids, mask, cf_embeds=cf, expert_weights=W3[[1, 2, 0]])
    cache, h = prefill(lm, ids, lens, W3, cf, room=4)
    m = mask.bool()
    torch.testing.assert_close(h[m], ref[m], **TOL)
    assert torch.count_nonzero(h[~m]) == 0
    assert (h[m] - swapped[m]).abs().max() > 1e-2  # another row's weights would be seen
    assert cache.lengths.tolist() == lens.tolist() and cache.capacity == 9 + 4
    # the same with an explicit placeholder mask and one [E] row for all
    _, h1 = prefill(lm, ids, lens, W3[2], cf, placeholder_mask=_is_ph(ids))
    with torch.no_grad():
        torch.testing.assert_close(h1[m], lm(ids, mask, cf_embeds=cf, expert_weights=W3[2])[m], **TOL)
    # kv_only_last: the same keys and values in every layer, the last layer's outputs skipped
    kv, h2 = prefill(lm, ids, lens, W3, cf, room=4, kv_only_last=True)
    for a, b in zip(cache.k + cache.v, kv.k + kv.v):
        assert torch.equal(a, b)
    assert (h2[m] - h[m]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_extends_match_full_forward(kind):
    """Prefill the first k_b tokens of each row, then two more extends (per-row chunk lengths >= 1)."""
    lm = _lm(kind)
    ids, lens, cf = _prompts([9, 6, 10], seed=1)
    T = ids.shape[1]
    mask = _mask(lens, T)
    with torch.no_grad():
        ref = lm(ids, mask, cf_embeds=cf, expert_weights=W3)
    cuts = torch.tensor([[0, 3, 5, 9], [0, 1, 2, 6], [0, 6, 8, 10]])  # row b's chunk j: cuts[b, j]..cuts[b, j+1]
    ph_order = _is_ph(ids).nonzero()  # row-major, as cf's rows
    cache = KVCache.empty(lm, 3, 12)
    for j in range(3):
        lo, hi = cuts[:, j], cuts[:, j + 1]
        n = hi - lo
        chunk = torch.full((3, int(n.max()) + 1), PAD)  # one column of padding more than needed
        for b in range(3):
            chunk[b, :n[b]] = ids[b, lo[b]:hi[b]]
        in_chunk = (ph_order[:, 1] >= lo[ph_order[:, 0]]) & (ph_order[:, 1] < hi[ph_order[:, 0]])
        h = extend(lm, cache, chunk, n, W3, cf[in_chunk])
        assert cache.lengths.tolist() == hi.tolist()
        for b in range(3):
            torch.testing.assert_close(h[b, :n[b]], ref[b, lo[b]:hi[b]], **TOL)
            assert torch.count_nonzero(h[b, n[b]:]) == 0
    with pytest.raises(ValueError, match="cache holds 12"):
        extend(lm, cache, torch.full((3, 3), 11), None, W3)


@pytest.mark.parametrize("kind", KINDS)
def test_shared_prefix_matches_each_candidate_alone(kind):
    lm = _lm(kind)
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(10, VOCAB, (1, 8), generator=g)
    prefix[0, 3] = USER_PH
    cf_user = torch.randn(1, 5, generator=g)
    slens = [3, 1, 5, 2]
    sufs = torch.full((4, 6), PAD)  # one column wider than the longest suffix
    for c, n in enumerate(slens):
        sufs[c, :n] = torch.randint(10, VOCAB, (n,), generator=g)
    sufs[0, 1] = sufs[2, 0] = ITEM_PH
    cf_items = torch.randn(2, 5, generator=g)
    w = W3[2]
    cache, _ = prefill(lm, prefix, None, w, cf_user, room=1)
    k0 = [k.clone() for k in cache.k]
    h = extend(lm, cache, sufs, slens, w, cf_items)
    assert cache.lengths.tolist() == [8] and all(torch.equal(a, b) for a, b in zip(k0, cache.k))
    items = iter(cf_items)
    for c, n in enumerate(slens):
        full = torch.cat([prefix[0], sufs[c, :n]])[None]
        cf = torch.cat([cf_user] + [next(items)[None] for _ in range(int(_is_ph(sufs[c, :n]).sum()))])
        with torch.no_grad():
            ref = lm(full, cf_embeds=cf, expert_weights=w)[0, 8:]
        torch.testing.assert_close(h[c, :n], ref, **TOL)
        assert torch.count_nonzero(h[c, n:]) == 0
    # a single candidate: shared=True leaves the cache alone; the default (1 row, 1-row cache) extends it
    h1 = extend(lm, cache, sufs[1:2, :1], [1], w, shared=True)
    torch.testing.assert_close(h1[0, 0], h[1, 0], **TOL)
    assert cache.lengths.tolist() == [8]
    extend(lm, cache, sufs[1:2, :1], [1], w)
    assert cache.lengths.tolist() == [9]


def _greedy_uncached(lm, ids, lens, w, cf, n, penalty=1.0, ngram=0, eos=None):
    """Greedy decoding recomputing lm(...) on prompt + generated tokens at each step, with a hand-written
    repetition penalty / no-repeat-ngram over the real prompt tokens (placeholders as one token 'PH')."""
    W = lm.lm_head_weight
    rows = [ids[b, :lens[b]].tolist() for b in range(len(lens))]
    gen = [[] for _ in rows]
    done = [False] * len(rows)
    for _ in range(n):
        seqs = [r + g for r, g in zip(rows, gen)]
        L = max(map(len, seqs))
        x = torch.tensor([s + [PAD] * (L - len(s)) for s in seqs])
        with torch.no_grad():
            h = lm(x, _mask([len(s) for s in seqs], L), cf_embeds=cf, expert_weights=w)
        for b, s in enumerate(seqs):
            if done[b]:
                continue
            sc = (h[b, len(s) - 1] @ W.T).clone()
            toks = ["PH" if t in (USER_PH, ITEM_PH) else t for t in s]
            for t in {t for t in toks if t != "PH"} if penalty != 1.0 else ():
                sc[t] = sc[t] / penalty if sc[t] > 0 else sc[t] * penalty
            if ngram:
                tail = toks[len(toks) - ngram + 1:]
                for i in range(len(toks) - ngram + 1):
                    win = toks[i:i + ngram]
                    if win[:-1] == tail and win[-1] != "PH":
                        sc[win[-1]] = float("-inf")
            t = int(sc.argmax())
            gen[b].append(t)
            done[b] = t == eos
        if all(done):
            break
    return gen


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_matches_uncached_decoding(kind):
    lm = _lm(kind)
    ids, lens, cf = _prompts([7, 4, 9], seed=3)
    out = generate(lm, ids, lens, W3, cf, max_new_tokens=12)
    assert out == _greedy_uncached(lm, ids, lens, W3, cf, 12)
    assert all(len(o) == 12 for o in out)
    # each row decodes with its own weights: other rows' weights give other tokens
    for perm in ([1, 2, 0], [2, 0, 1]):
        swapped = generate(lm, ids, lens, W3[perm], cf, max_new_tokens=12)
        assert all(a != b for a, b in zip(out, swapped)), (out, swapped)


def _cut(toks, eos):
    """toks up to and including the first token in eos."""
    stop = [i for i, t in enumerate(toks) if t in eos]
    return toks[:stop[0] + 1] if stop else toks


def test_eos_stops_rows_and_max_new_tokens():
    lm = _lm("llama")
    ids, lens, cf = _prompts([7, 4, 9], seed=3)
    full = generate(lm, ids, lens, W3, cf, max_new_tokens=12)
    eos = full[1][4]  # row 1 stops at step <= 4; the others at their first occurrence, if any
    out = generate(lm, ids, lens, W3, cf, max_new_tokens=12, eos_token_id=eos)
    assert out == [_cut(f, {eos}) for f in full]  # EOS included, nothing after it
    assert len(out[1]) <= 5 and any(len(o) == 12 for o in out)  # the batch goes on after a row stopped
    assert out == _greedy_uncached(lm, ids, lens, W3, cf, 12, eos=eos)
    two = [full[0][2], full[2][6]]
    assert generate(lm, ids, lens, W3, cf, max_new_tokens=12, eos_token_id=two) == [_cut(f, set(two)) for f in full]
    assert generate(lm, ids, lens, W3, cf, max_new_tokens=3) == [f[:3] for f in full]
    assert generate(lm, ids, lens, W3, cf, max_new_tokens=1) == [f[:1] for f in full]
    every = generate(lm, ids, lens, W3, cf, max_new_tokens=12, eos_token_id=[f[0] for f in full])
    assert every == [f[:1] for f in full]  # all rows stop at once


def test_sampling_is_reproducible_and_top_p_tiny_is_greedy():
    lm = _lm("qwen3")
    ids, lens, cf = _prompts([7, 4, 9], seed=4)

    def sample(seed, **kw):
        return generate(lm, ids, lens, W3, cf, max_new_tokens=10, temperature=1.3, top_p=0.9,
                        generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = sample(0), sample(0), sample(1)
    assert a == b and a != c
    greedy = generate(lm, ids, lens, W3, cf, max_new_tokens=10)
    assert a != greedy
    tiny_p = generate(lm, ids, lens, W3, cf, max_new_tokens=10, temperature=1.0, top_p=1e-9,
                      generator=torch.Generator().manual_seed(0))
    assert tiny_p == greedy  # top-p keeps the argmax token alone


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_repetition_penalty_and_no_repeat_ngram(kind):
    lm = _lm(kind)
    ids, lens, cf = _prompts([7, 4, 9], seed=0)
    n = 16
    greedy = generate(lm, ids, lens, W3, cf, max_new_tokens=n)

    def repeats(b, toks):
        seq = ["PH" if t in (USER_PH, ITEM_PH) else t for t in ids[b, :lens[b]].tolist()] + toks
        grams = [tuple(seq[i:i + 2]) for i in range(len(seq) - 1) if "PH" not in seq[i:i + 2]]
        return len(grams) - len(set(grams))

    assert all(repeats(b, g) > 0 for b, g in enumerate(greedy))  # the tiny models loop: the processors act
    no_rep = generate(lm, ids, lens, W3, cf, max_new_tokens=n, no_repeat_ngram_size=2)
    assert all(repeats(b, g) == 0 for b, g in enumerate(no_rep)) and no_rep != greedy
    assert no_rep == _greedy_uncached(lm, ids, lens, W3, cf, n, ngram=2)
    pen = generate(lm, ids, lens, W3, cf, max_new_tokens=n, repetition_penalty=3.0)
    assert pen != greedy and pen == _greedy_uncached(lm, ids, lens, W3, cf, n, penalty=3.0)
    both = generate(lm, ids, lens, W3, cf, max_new_tokens=n, repetition_penalty=1.5, no_repeat_ngram_size=3)
    assert both == _greedy_uncached(lm, ids, lens, W3, cf, n, penalty=1.5, ngram=3)


def test_bf16_model_and_autocast():
    """A bf16 model keeps a bf16 cache and matches its own full forward; under bf16 autocast an fp32 model
    (fp32 or bf16 cache) agrees with the fp32 forward to bf16 precision, shared-prefix mode included."""
    ids, lens, cf = _prompts([7, 4, 9], seed=5)
    m = _mask(lens, ids.shape[1]).bool()
    lmb = _lm("llama").to(torch.bfloat16)
    cache, h = prefill(lmb, ids, lens, W3, cf, room=2)
    assert cache.k[0].dtype == h.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(h[m], lmb(ids, m.long(), cf_embeds=cf, expert_weights=W3)[m], atol=1e-2, rtol=1e-2)
    lm = _lm("qwen2")
    with torch.no_grad():
        ref = lm(ids, m.long(), cf_embeds=cf, expert_weights=W3)
    for dtype in (None, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cache, h = prefill(lm, ids, lens, W3, cf, dtype=dtype)
            hs = extend(lm, cache.select([2]), ids[:2, :3], [3, 2], W3[2], cf[:1])  # row 2 as a shared prefix
        torch.testing.assert_close(h[m].float(), ref[m], atol=0.1, rtol=0.05)
        with torch.no_grad():
            r0 = lm(torch.cat([ids[2], ids[0, :3]])[None], cf_embeds=cf[[1, 2, 0]], expert_weights=W3[2])[0, 9:]
        torch.testing.assert_close(hs[0, :3].float(), r0, atol=0.1, rtol=0.05)


@pytest.mark.skipif(not packed_attention_available(torch.zeros(2, 2, 16, dtype=torch.bfloat16)),
                    reason="the brgemm attention kernels do not build or run on this machine (an AVX2-only CPU)")
def test_bf16_prefill_on_the_cpu_attention_kernel(monkeypatch):
    """A bf16 model's prefill (fresh rows) runs the brgemm forward over the packed rows where it is available;
    it agrees with the SDPA path (THINKREC_CPU_ATTENTION=0) to bf16 precision."""
    lmb = _lm("llama").to(torch.bfloat16)
    assert lmb.llm.model.layers[0].self_attn.head_dim == 16  # the head dim the skip condition probes
    ids, lens, cf = _prompts([7, 4, 9, 70], seed=6)
    m = _mask(lens, ids.shape[1]).bool()
    w = torch.cat([W3, W3[:1]])
    _, h_kernel = prefill(lmb, ids, lens, w, cf)
    monkeypatch.setenv("THINKREC_CPU_ATTENTION", "0")
    _, h_sdpa = prefill(lmb, ids, lens, w, cf)
    assert not torch.equal(h_kernel[m], h_sdpa[m])  # the two paths did run
    torch.testing.assert_close(h_kernel[m].float(), h_sdpa[m].float(), atol=3e-2, rtol=3e-2)


def test_errors():
    lm = _lm("llama")
    ids, lens, _ = _prompts([5, 3], slots=())
    with pytest.raises(ValueError, match="lengths"):
        prefill(lm, ids, [5, 0])
    cache, _ = prefill(lm, ids, lens, room=2)
    with pytest.raises(ValueError, match="per-row mode"):
        extend(lm, cache, ids[:1, :1], [1])
    with pytest.raises(ValueError, match="cf_embeds"):
        extend(lm, cache, torch.tensor([[USER_PH], [11]]), [1, 1])
    lm.unpacked_reason = "model type 'gemma2' is not one of (...)"
    with pytest.raises(NotImplementedError, match="gemma2"):
        prefill(lm, ids, lens)
    lm2 = _tiny("llama")
    for mod in lm2.lora_layers().values():
        mod.dropout = torch.nn.Dropout(0.1)
    with pytest.raises(RuntimeError, match="eval"):
        prefill(lm2.train(), ids, lens)
