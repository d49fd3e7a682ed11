"""Incremental (KV-cached) forward of ThinkRecLM for the padding-free model types (thinkrec/model/packed.py).

A `KVCache` holds, per decoder layer, keys and values [Bc, Hkv, capacity, d] (after RoPE, and after
Qwen3's k_norm), rows filled left-aligned: row b's token at position p sits at index p, and
`lengths[b]` tokens are filled. `extend` runs B rows of new tokens [B, S] (right-padded, `lengths` [B]):

    token s of row b:  RoPE position start_b + s,  attends to its row's cached keys 0..start_b - 1 and
                       to its own new tokens 0..s

Two modes:
  * per row (cache batch == B): start_b = cache.lengths[b]; the new keys/values are written into the
    cache and cache.lengths += lengths. Prefill (from an empty cache: one causal SDPA over the new
    tokens, exactly as packed.py) and decode steps (S = 1) use it.
  * shared prefix (cache batch == 1): start_b = P = cache.lengths[0] for every row; all B rows attend to
    the one cached prefix (a user's prompt, B candidate items after it); the cache is not modified.

As in packed.py, linear layers, norms and the MLP run on the real new tokens only (N = sum lengths),
each linear layer gets the per-token adapter weights (`_linear`), and attention runs on [B, H, S, d]
grids whose padding slots are seen by padding queries only (their outputs are dropped).

Attention without copies of the cache (query head h uses key/value head h // g, g = H / Hkv):
  * per row, non-empty cache: queries grouped per kv head, q [B, Hkv, g*S, d] @ K[:, :, :L]^T, one
    masked softmax (key j visible iff j <= start_b + s), @ V. No repeat_interleave of K/V (SDPA's math
    fallback for GQA with a mask would repeat them).
  * shared prefix: the B*g*S queries of each kv head are folded into one matmul against the prefix keys
    [Hkv, P, d] (a copy of the queries only, never of the prefix), the suffix-to-suffix part is a
    causal [B, Hkv, g*S, S] block, and both parts share one softmax over the key axis [P + S]
    (joint max, exp, joint sum), so neither B copies of the prefix nor the concatenated scores exist.
    The scores [B*H*S, P] are materialised (fp32 for the softmax): chunk the candidates if memory is
    short (100 candidates x 32 heads x 30 tokens x 1000 prefix tokens = 384 MB per layer, transient).

Capacity is fixed when the cache is allocated (`KVCache.empty`, `prefill(room=...)`); a per-row extend that
would pass it raises. `KVCache.select` keeps some rows (generation drops finished ones).

Inference only: everything runs under torch.no_grad(); LoRA dropout would be active in train mode, so
`extend` refuses a model whose LoRA layers are training with dropout (call lm.eval()).
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from thinkrec_kernels.cpu_attention import packed_attention_available, packed_causal_attention

from .packed import _linear, _sdpa, decoder_layer


@dataclass
class KVCache:
    """Per-layer keys/values [Bc, Hkv, capacity, d] (left-aligned rows, zeros where never written) and
    lengths [Bc] (long, tokens filled per row), all on one device."""

    k: list
    v: list
    lengths: torch.Tensor

    @classmethod
    def empty(cls, lm, batch: int, capacity: int, dtype=None, device=None) -> "KVCache":
        """Zeroed cache for `batch` rows of up to `capacity` tokens. dtype/device default to the LM head's.
        Keys/values are stored in this dtype and cast to the queries' when read: a bf16 model gives bf16
        queries (no casts); under bf16 autocast an fp32 model's queries are fp32 after RoPE, so a bf16
        cache halves its memory at the cost of a cast per read."""
        _require_packed(lm)
        dtype = dtype or lm.lm_head_weight.dtype
        device = device or lm.lm_head_weight.device
        shapes = []
        for layer in lm.llm.model.layers:
            attn = layer.self_attn
            shapes.append((batch, attn.k_proj.out_features // attn.head_dim, capacity, attn.head_dim))
        return cls([torch.zeros(s, dtype=dtype, device=device) for s in shapes],
                   [torch.zeros(s, dtype=dtype, device=device) for s in shapes],
                   torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def select(self, rows) -> "KVCache":
        """A new cache holding rows `rows` (index tensor or list) of this one, in that order (copies)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        return KVCache([k[rows] for k in self.k], [v[rows] for v in self.v], self.lengths[rows].clone())


def _require_packed(lm) -> None:
    if not lm.packed:
        raise NotImplementedError(f"the KV-cached forward needs a padding-free model type: {lm.unpacked_reason}")


def _check_eval(lm) -> None:
    for mod in lm.lora_layers().values():
        if mod.training and not isinstance(mod.dropout, nn.Identity):
            raise RuntimeError("the KV-cached forward is for inference: the model is in train mode with LoRA "
                               "dropout, call lm.eval() first")


@dataclass
class _Step:
    """Where the N real new tokens of a [B, S] extend go."""

    row: torch.Tensor  # [N] row of each token
    col: torch.Tensor  # [N] index among the row's new tokens
    pos: torch.Tensor  # [N] RoPE position = index in the row's cache
    start: torch.Tensor  # [B] cached tokens each row sees (per row: cache.lengths; shared: P)
    B: int
    S: int
    shared: bool
    fresh: bool  # per row with every row empty: plain causal attention over the new tokens
    L: int  # keys to read: per row max(start + lengths), shared P

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """[N, H, d] -> [B, H, S, d] (contiguous, zeros at padding)."""
        out = x.new_zeros(self.B, x.shape[1], self.S, x.shape[2])
        out[self.row, :, self.col] = x
        return out


def _attend_rows(q, K, V, start, scale):
    """Per-row cached attention. q [B, H, S, d]; K, V [B, Hkv, L, d]; query s of row b sees keys
    0..start_b + s. Queries grouped per kv head, so K/V are read in place. -> [B, H, S, d]."""
    B, H, S, d = q.shape
    hkv, L = K.shape[1], K.shape[2]
    g = H // hkv
    s = torch.matmul(q.view(B, hkv, g * S, d), K.to(q.dtype).transpose(-1, -2)).float() * scale
    qpos = start[:, None] + torch.arange(S, device=q.device)  # [B, S]
    seen = torch.arange(L, device=q.device) <= qpos[..., None]  # [B, S, L]
    s = s.view(B, hkv, g, S, L).masked_fill_(~seen[:, None, None], float("-inf"))
    p = torch.softmax(s, -1).to(V.dtype).view(B, hkv, g * S, L)
    return torch.matmul(p, V).to(q.dtype).view(B, H, S, d)


def _attend_shared(q, K0, V0, k, v, scale):
    """Shared-prefix attention. q [B, H, S, d]; prefix K0, V0 [Hkv, P, d] (P >= 1); the rows' own keys and
    values k, v [B, Hkv, S, d]. Query s of row b sees the whole prefix and its row's keys 0..s, in one
    softmax. -> [B, H, S, d]."""
    B, H, S, d = q.shape
    hkv, P = K0.shape[0], K0.shape[1]
    g = H // hkv
    qg = q.view(B, hkv, g * S, d)
    # prefix part: every row's queries of kv head j in one matmul against that head's prefix keys
    qf = qg.transpose(0, 1).reshape(hkv, B * g * S, d)
    sp = torch.matmul(qf, K0.to(q.dtype).transpose(-1, -2)).float().mul_(scale).view(hkv, B, g * S, P)
    # suffix part: row b's queries against row b's own new keys, causal
    ss = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(scale)  # [B, Hkv, g*S, S]
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    ss = ss.view(B, hkv, g, S, S).masked_fill_(~causal, float("-inf")).view(B, hkv, g * S, S)
    # one softmax over [prefix keys, own keys]: joint max, exp, joint sum
    m = torch.maximum(sp.amax(-1).transpose(0, 1), ss.amax(-1))  # [B, Hkv, g*S]
    ep = sp.sub_(m.transpose(0, 1)[..., None]).exp_()
    es = ss.sub_(m[..., None]).exp_()
    denom = ep.sum(-1).transpose(0, 1) + es.sum(-1)
    op = torch.matmul(ep.to(V0.dtype).view(hkv, B * g * S, P), V0).view(hkv, B, g * S, d).transpose(0, 1)
    os_ = torch.matmul(es.to(v.dtype), v)
    o = (op.float() + os_.float()) / denom[..., None]
    return o.to(q.dtype).reshape(B, H, S, d)


def _layer_extend(layer, h, st: _Step, cos, sin, w, K, V, kv_only: bool = False):
    """One decoder layer on the N new tokens h [N, D] -> [N, D] (packed.decoder_layer with cached attention);
    K, V: this layer's cache tensors (per row: the new keys/values are written into them). kv_only (per row):
    write the keys and values, skip the rest (the last layer of a prefix whose own outputs nobody reads); h
    comes back unchanged."""
    scale = layer.self_attn.scaling

    def attend(q, k, v):
        if kv_only or not st.shared:
            K[st.row, :, st.pos] = k.to(K.dtype)
            V[st.row, :, st.pos] = v.to(V.dtype)
        if kv_only:
            return None
        if st.fresh and packed_attention_available(q):  # bf16 CPU: brgemm over the packed rows, no grid
            cu = torch.cat([st.row.new_zeros(1), torch.bincount(st.row, minlength=st.B).cumsum(0)])
            return packed_causal_attention(q, k, v, cu, scale).reshape(len(q), -1)
        Q = st.grid(q)
        if st.shared and st.L:
            o = _attend_shared(Q, K[0, :, :st.L], V[0, :, :st.L], st.grid(k), st.grid(v), scale)
        elif st.shared:  # empty prefix: the rows alone
            o = _sdpa(Q, st.grid(k), st.grid(v), is_causal=True, scale=scale)
        elif st.fresh:  # the new tokens sit at 0..S-1 of each row: plain causal attention (fused kernels)
            o = _sdpa(Q, K[:, :, :st.S].to(Q.dtype), V[:, :, :st.S].to(Q.dtype), is_causal=True, scale=scale)
        else:
            o = _attend_rows(Q, K[:, :, :st.L], V[:, :, :st.L], st.start, scale)
        return o[st.row, :, st.col].reshape(len(q), -1)

    return decoder_layer(layer, h, cos, sin, attend, lambda mod, x: _linear(mod, x, w, None), kv_only=kv_only)


def _in_precision(fn):
    """Run fn(lm, ...) inside the model's precision context (bf16 autocast for a bf16 model)."""

    @functools.wraps(fn)
    def wrapper(lm, *args, **kwargs):
        with lm.autocast():
            return fn(lm, *args, **kwargs)
    return wrapper


@torch.no_grad()
@_in_precision
def extend(lm, cache: KVCache, input_ids, lengths=None, expert_weights=None, cf_embeds=None,
           placeholder_mask=None, shared: bool | None = None, kv_only_last: bool = False) -> torch.Tensor:
    """Run new tokens through the model against `cache`; returns final hidden states (after the final norm)
    [B, S, D], zeros at padding (s >= lengths[b]).

    input_ids: [B, S] right-padded new tokens; lengths: [B] new tokens per row, 1..S (None: all S);
    expert_weights: [B, E], [E] or None (global); cf_embeds: [P, d_cf] for the placeholder positions of
    the new tokens in row-major order, placeholder_mask: [B, S] bool (default: from the ids), as lm.embed.
    shared: None = shared-prefix mode iff the cache has 1 row and B > 1 (with B == 1 the one row is
    extended: pass shared=True to score a single candidate without touching the cache); per-row mode
    needs cache.batch == B and writes the new tokens into the cache (capacity permitting).
    kv_only_last (per-row mode): the last layer only writes its keys and values (a prefix that later
    tokens read but whose own outputs are not needed); the returned states are then not the model's.
    """
    _require_packed(lm)
    _check_eval(lm)
    B, S = input_ids.shape
    dev = cache.lengths.device
    input_ids = input_ids.to(dev)
    lengths = torch.full((B,), S, dtype=torch.long, device=dev) if lengths is None else \
        torch.as_tensor(lengths, dtype=torch.long).to(dev)
    if lengths.shape != (B,) or B == 0 or S == 0 or bool(((lengths < 1) | (lengths > S)).any()):
        raise ValueError(f"extend: lengths must be [B] = [{B}] with values in 1..S = {S}, got {lengths.tolist()}")
    if shared is None:
        shared = cache.batch == 1 and B > 1
    if shared and cache.batch != 1:
        raise ValueError(f"extend: the shared-prefix mode needs a cache of 1 row, it has {cache.batch}")
    if not shared and cache.batch != B:
        raise ValueError(f"extend: {B} rows against a cache of {cache.batch} rows (per-row mode needs equal "
                         f"batches; shared-prefix mode a 1-row cache)")
    start = cache.lengths.expand(B) if shared else cache.lengths
    # one host sync: longest new row, keys to read (per row: longest row after this call; shared: P),
    # and whether every row of the cache is still empty
    T, L, n_filled = torch.stack([lengths.max(), (start if shared else start + lengths).max(),
                                  cache.lengths.max()]).tolist()
    if not shared and L > cache.capacity:
        raise ValueError(f"extend: rows would reach {L} tokens, the cache holds {cache.capacity} "
                         f"(allocate more room: KVCache.empty / prefill(room=...))")

    m = torch.arange(T, device=dev) < lengths[:, None]  # [B, T] real new tokens (columns past T: padding)
    row, col = m.nonzero(as_tuple=True)
    st = _Step(row, col, start[row] + col, start, B, T, shared, not shared and n_filled == 0, L)
    ph = None if placeholder_mask is None else placeholder_mask.to(dev)[row, col]
    h = lm.embed(input_ids[row, col], cf_embeds, ph)
    w = expert_weights
    if w is not None:
        w = w.to(dev)
        if w.dim() == 2:
            if w.shape[0] != B:
                raise ValueError(f"extend: expert_weights {tuple(w.shape)} for {B} rows")
            w = w[row]
    cos, sin = lm.llm.model.rotary_emb(h, st.pos[None])
    cos, sin = cos[0], sin[0]
    if kv_only_last and shared:
        raise ValueError("extend: kv_only_last writes the cache, which the shared-prefix mode does not")
    last = len(lm.llm.model.layers) - 1
    for i, layer in enumerate(lm.llm.model.layers):
        h = _layer_extend(layer, h, st, cos, sin, w, cache.k[i], cache.v[i], kv_only_last and i == last)
    h = lm.llm.model.norm(h)
    if not shared:
        cache.lengths += lengths
    out = h.new_zeros(B, S, h.shape[-1])
    out[row, col] = h
    return out


@torch.no_grad()
def prefill(lm, input_ids, lengths=None, expert_weights=None, cf_embeds=None, placeholder_mask=None,
            room: int = 0, dtype=None, kv_only_last: bool = False):
    """(cache, h): a new cache of capacity max(lengths) + room filled with the right-padded prompts
    input_ids [B, T], and their final hidden states h [B, T, D] (zeros at padding; not the model's with
    kv_only_last, for a prefix only read through the cache). Arguments as extend."""
    B, T = input_ids.shape
    lens = torch.full((B,), T, dtype=torch.long) if lengths is None else torch.as_tensor(lengths)
    cache = KVCache.empty(lm, B, int(lens.max()) + int(room), dtype=dtype)
    h = extend(lm, cache, input_ids, lens, expert_weights, cf_embeds, placeholder_mask, shared=False,
               kv_only_last=kv_only_last)
    return cache, h
