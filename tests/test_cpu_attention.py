"""The bf16 CPU attention backward on brgemm (thinkrec_kernels/cpu_attention.py) against SDPA: gradients of
ragged packed rows (partial 64-token tiles, one-token rows), grouped and plain heads; the same bits on any
thread count; and when it runs at all."""

import pytest
import torch
import torch.nn.functional as F

from thinkrec_kernels import cpu_attention
from thinkrec_kernels.cpu_attention import packed_attention_available, packed_causal_attention, to_grid


def _probe(d=64):
    return torch.zeros(4, 2, d, dtype=torch.bfloat16, requires_grad=True)


needs_kernel = pytest.mark.skipif(not packed_attention_available(_probe()),
                                  reason="the brgemm attention backward does not build or run on this machine")


def _rows(lengths, H, G, d, seed):
    g = torch.Generator().manual_seed(seed)
    lt = torch.tensor(lengths)
    B, L, N = len(lengths), max(lengths), int(lt.sum())
    row = torch.repeat_interleave(torch.arange(B), lt)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lt.cumsum(0)])
    q, k, v = (torch.randn(N, h, d, generator=g) for h in (H, G, G))
    do = torch.randn(N, H, d, generator=g)
    return (q, k, v, do), row * L + pos, cu, B, L


def _sdpa(q, k, v, slot, B, L, scale):
    o = F.scaled_dot_product_attention(to_grid(q, slot, B, L), to_grid(k, slot, B, L), to_grid(v, slot, B, L),
                                       is_causal=True, enable_gqa=True, scale=scale)
    return o.transpose(1, 2).reshape(B * L, q.shape[1], -1)[slot]


def _grads(f, tensors, dtype):
    q, k, v, do = (t.detach().to(dtype) for t in tensors)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = f(q, k, v)
    o.backward(do)
    return [o.detach()] + [t.grad for t in (q, k, v)]


def _rel(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


@needs_kernel
@pytest.mark.parametrize("lengths,H,G,d", [([1, 63, 64, 65, 130], 4, 2, 16), ([200, 7, 129], 9, 3, 64),
                                           ([70, 33], 2, 2, 128)])
def test_gradients_match_sdpa(lengths, H, G, d):
    """o, dq, dk, dv are within 1e-2 (relative norm) of SDPA's at fp32 and no farther than SDPA's own bf16 ones
    are, plus a margin (measured: gradients 2.5e-3 against SDPA bf16's 2.5e-3 to 5.7e-3 on a SmolLM2-shaped
    batch)."""
    tensors, slot, cu, B, L = _rows(lengths, H, G, d, seed=d)
    scale = d ** -0.5
    ref = _grads(lambda q, k, v: _sdpa(q, k, v, slot, B, L, scale), tensors, torch.float32)
    sdpa16 = _grads(lambda q, k, v: _sdpa(q, k, v, slot, B, L, scale), tensors, torch.bfloat16)
    ours = _grads(lambda q, k, v: packed_causal_attention(q, k, v, cu, scale), tensors, torch.bfloat16)
    for name, a, s, r in zip(("o", "dq", "dk", "dv"), ours, sdpa16, ref):
        assert a.dtype == torch.bfloat16 and a.shape == r.shape
        assert _rel(a, r) < 1e-2, (name, _rel(a, r))
        assert _rel(a, r) <= _rel(s, r) * 1.5 + 1e-3, (name, _rel(a, r), _rel(s, r))


@needs_kernel
def test_forward_log_sum_exp():
    """The forward's lse (the backward reads it) is log sum_j exp(scale * q . k_j) over each query's causal keys,
    computed at fp64 from the same bf16 inputs; o is that softmax's average of v."""
    tensors, slot, cu, B, L = _rows([1, 64, 65, 140], 4, 2, 64, seed=5)
    q, k, v = (t.to(torch.bfloat16) for t in tensors[:3])
    o, lse = cpu_attention._load().attention_fwd(q, k, v, cu, 0.125)
    for b in range(B):
        r = slice(int(cu[b]), int(cu[b + 1]))
        qb, kb, vb = (t[r].double().repeat_interleave(2 if t.shape[1] == 2 else 1, dim=1) for t in (q, k, v))
        s = torch.einsum("qhd,khd->hqk", qb, kb) * 0.125
        n = qb.shape[0]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        ref_lse = torch.logsumexp(s, -1).t()
        assert (lse[r].double() - ref_lse).abs().max() < 2e-2 + 1e-3 * ref_lse.abs().max()
        ref_o = torch.einsum("hqk,khd->qhd", s.softmax(-1), vb)
        assert _rel(o[r], ref_o) < 1e-2


@needs_kernel
def test_same_bits_on_any_thread_count():
    """One task per (row, kv head), no atomics: the gradients do not depend on how many threads split the
    tasks, so a resumed run on another thread count continues with the same numbers."""
    tensors, slot, cu, B, L = _rows([90, 150, 3, 64], 6, 2, 32, seed=3)
    threads = torch.get_num_threads()
    run = lambda: _grads(lambda q, k, v: packed_causal_attention(q, k, v, cu, 0.2), tensors,
                         torch.bfloat16)
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_when_it_runs(monkeypatch):
    """Only bf16 CPU tensors (with or without autograd: scoring runs the forward) on a head dim oneDNN packs
    (multiples of 16); THINKREC_KERNELS=torch and THINKREC_CPU_ATTENTION=0 put SDPA back. Unavailable cases say
    False, never raise."""
    assert not packed_attention_available(_probe().float())
    with torch.no_grad():  # the answer does not depend on autograd
        assert packed_attention_available(_probe()) == bool(cpu_attention._load())
    assert not packed_attention_available(_probe(d=8))
    monkeypatch.setenv("THINKREC_CPU_ATTENTION", "0")
    assert not packed_attention_available(_probe())
    monkeypatch.delenv("THINKREC_CPU_ATTENTION")
    monkeypatch.setenv("THINKREC_KERNELS", "torch")
    assert not packed_attention_available(_probe())
    monkeypatch.delenv("THINKREC_KERNELS")
    assert packed_attention_available(_probe()) == bool(cpu_attention._ext)


def test_no_compiler_means_sdpa(monkeypatch):
    """Where the C++ cannot be built (no compiler, no headers), one warning says so and SDPA's backward runs:
    packed_attention_available is False, training goes on."""
    import torch.utils.cpp_extension

    from thinkrec_kernels import _cpu_ext

    def fail(*a, **k):
        raise RuntimeError("Error building extension 'thinkrec_cpu': c++: not found")

    monkeypatch.setattr(_cpu_ext, "_ext", None)
    monkeypatch.setattr(cpu_attention, "_ext", None)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fail)
    with pytest.warns(UserWarning, match="could not be built .*c\\+\\+: not found.*SDPA's attention backward"):
        assert not packed_attention_available(_probe())
    assert _cpu_ext._ext is False and cpu_attention._ext is False
    assert not packed_attention_available(_probe())  # decided once: no second build attempt or warning
