"""Padding-free decoder forward for Llama-family models (Llama 2/3, SmolLM2, Qwen2, Qwen3, Mistral).

A batch of B padded rows [B, T] holds N = sum_b len_b real tokens. Here everything but attention runs on
the N packed tokens [N, D], so no FLOPs go to padding in the linear layers, norms and MLP (random batches of
real ML-1M prompts are 15-20% padding); attention runs on a right-aligned copy [B, H, L, d], L = max len_b:

    token (b, p)  ->  slot b * L + p            p = position of the token among row b's real tokens
    o = SDPA(Q, K, V, is_causal=True)           a real query at p sees keys 0..p of its row, all real; the
                                                zero slots past len_b are seen only by padding queries,
                                                whose outputs are dropped when gathering back

so no mask is built and the fused CPU/GPU attention kernels apply. Positions (RoPE) count real tokens, so a
row's result does not depend on how it was padded. The layer's own modules are called (norms, projections,
MLP, rotary embedding), so LoRALinear, RoPE scaling (Llama 3) and biases (Qwen2) work unchanged.

Only the positions the loss reads (`keep`): in the last layer run, keys and values are computed for every
token, but queries, attention, o_proj and the MLP only for the kept tokens (one Yes position per row plus
the answer tokens), which removes ~1 layer of work. The kept queries attend through an explicit causal mask.

bf16 on a CPU (the full layers, no shared prefixes): attention runs on oneDNN's brgemm over the packed rows,
forward and backward (thinkrec_kernels/cpu_attention.py), not SDPA on the grid, whose backward is no faster in
bf16 than in fp32.

Per-token adapter weights: a row's [E] weights are gathered per token (`w[row]`), and in the pruned layer
per kept token for the modules that only see kept tokens; every linear layer is called here with the
weights of the tokens it sees (`_linear`), so nothing is stored in the modules and gradient checkpointing's
recompute gets the same weights as arguments. `merged` ({LoRALinear: nn.Linear}) runs given layers with
merged weights instead (stage 3's frozen prefix) without touching the model.

Shared prefixes (`share` = (lead [B], n [B])): row b's first n_b real tokens are the same tokens, at the same
positions, as row lead_b's (rows of one user with one history: thinkrec.batches.collate finds them). They
are packed once, in the lead row, so every linear layer, norm and MLP runs on them once; attention still
runs per row, its key/value grid gathered (`gather`) from the packed tokens, so row b's own tokens see the
lead row's keys and values at the shared positions and the backward adds their gradients up there. Each
token's output is read from its own row's slot, as without sharing. A row's result is the same whether
its prefix was shared or not, up to float rounding.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from thinkrec_kernels.cpu_attention import packed_attention_available, packed_causal_attention, to_grid

from . import fused
from .lora import LoRALinear

PACKED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def packed_supported(config) -> str:
    """'' if this config runs padding-free, else the reason it does not (the caller falls back to HF)."""
    mt = getattr(config, "model_type", None)
    if mt not in PACKED_MODEL_TYPES:
        return f"model type {mt!r} is not one of {PACKED_MODEL_TYPES}"
    window = getattr(config, "sliding_window", None)
    if window and (mt == "mistral" or getattr(config, "use_sliding_window", False)):
        return "sliding-window attention"
    return ""


@dataclass
class Packing:
    """Where the real tokens of a padded [B, T] batch go. All index tensors are on the batch's device.
    With shared prefixes, N counts each shared token once (in its lead row)."""

    flat: torch.Tensor  # [N] indices of the packed tokens in the row-major [B * T] grid
    row: torch.Tensor  # [N] row of each token
    pos: torch.Tensor  # [N] position of each token among its row's real tokens (RoPE position)
    slot: torch.Tensor  # [N] row * L + pos: the token's place in the right-aligned [B, L] attention layout
    lengths: torch.Tensor  # [B] real tokens of each row, shared ones included
    B: int
    T: int
    L: int
    grid: torch.Tensor  # [B * T] packed index of every grid position (-1 at padding; a shared one: its lead's)
    gather: torch.Tensor | None = None  # [B * L] packed index of each attention slot (N = padding); None: no sharing

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, share=None) -> "Packing":
        """share: None, or (lead [B], n [B]) long: row b's first n_b real tokens are row lead_b's (a lead row
        shares nothing itself: n = 0 where lead_b = b)."""
        B, T = attention_mask.shape
        m = attention_mask.bool()
        dev = m.device
        lengths = m.sum(1)
        L = max(int(lengths.max()), 1) if B else 1
        pos_grid = m.long().cumsum(1) - 1
        n = None
        if share is not None:
            lead, n = (torch.as_tensor(x, dtype=torch.long, device=dev) for x in share)
            if not bool((n > 0).any()):
                n = None
            elif bool(((n > 0) & ((n[lead] > 0) | (n > lengths) | (n > lengths[lead]))).any()):
                raise ValueError("share: a lead row shares a prefix itself, or a shared prefix is longer "
                                 "than one of its rows")
        own = m if n is None else m & (pos_grid >= n[:, None])
        flat = own.reshape(-1).nonzero().squeeze(1)
        row = torch.div(flat, T, rounding_mode="floor")
        pos = pos_grid.reshape(-1)[flat]
        N = len(flat)
        table = torch.full((B, L), -1 if n is None else N, dtype=torch.long, device=dev)  # [row, pos] -> packed
        table[row, pos] = torch.arange(N, device=dev)
        gather = None
        if n is not None:  # shared positions take the lead row's packed tokens
            shared = torch.arange(L, device=dev)[None, :] < n[:, None]
            table = torch.where(shared, table[lead], table)
            gather = table.reshape(-1)
        grid = torch.where(m, table.gather(1, pos_grid.clamp(min=0)), -1).reshape(-1)
        return cls(flat, row, pos, row * L + pos, lengths, B, T, L, grid, gather)

    def index(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Packed index of grid positions (rows, cols); every position must be a real token."""
        out = self.grid[rows * self.T + cols]
        if bool((out < 0).any()):
            raise ValueError("a selected position is a padding token")
        return out

    def offsets(self) -> torch.Tensor:
        """[B + 1]: without shared prefixes, row b's packed tokens are cu[b] .. cu[b + 1]."""
        return torch.cat([self.lengths.new_zeros(1), self.lengths.cumsum(0)])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...] (a shared token: its lead row's)."""
        return x.reshape(self.B * self.T, *x.shape[2:])[self.flat]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...] with zeros at padding (shared positions repeat their lead row's)."""
        out = x.new_zeros(self.B * self.T, *x.shape[1:])
        if self.gather is None:
            out.index_copy_(0, self.flat, x)
        else:
            real = self.grid >= 0
            out[real] = x[self.grid[real]]
        return out.view(self.B, self.T, *x.shape[1:])


def _to_grid(x, pk: Packing):
    """[N, H, d] packed -> [B, H, L, d] right-aligned (zeros past each row's end; shared positions: the lead
    row's tokens)."""
    if pk.gather is None:
        return to_grid(x, pk.slot, pk.B, pk.L)
    grid = torch.cat([x, x.new_zeros(1, *x.shape[1:])]).index_select(0, pk.gather)
    return grid.view(pk.B, pk.L, *x.shape[1:]).transpose(1, 2)


_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)  # SDPA's enable_gqa


def _sdpa(q, k, v, **kw):
    if q.shape[1] != k.shape[1]:  # grouped-query attention
        if _GQA:  # K/V heads shared in the kernel: no repeated copies kept for the backward
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def _linear(mod, x, w, merged):
    """mod(x) with adapter weights w [n, E] (or [E], None) when mod is a LoRALinear; its merged copy
    instead when `merged` holds one."""
    if merged and mod in merged:
        return merged[mod](x)
    return mod(x, w) if isinstance(mod, LoRALinear) else mod(x)


def decoder_layer(layer, h, cos, sin, attend, lin, keep=None, lin_kept=None, kv_only: bool = False):
    """One Llama-family decoder layer on tokens h [N, D] (RoPE cos, sin [N, d]): the one layer function of the
    padding-free forward (`layer_forward`) and the KV-cached one (thinkrec/model/cached.py), which differ only
    in `attend`:

        attend(q [Nq, H, d] or None, k [N, Hkv, d], v [N, Hkv, d]) -> o [Nq, H * d] (None with kv_only)

    lin(mod, x): a linear layer with the tokens' adapter weights; keep: token indices whose queries, attention
    output, o_proj and MLP are computed (the rest only give keys and values), with lin_kept their linear;
    kv_only: keys and values only (attend stores them), h comes back unchanged. -> [N, D] or [len(keep), D]."""
    attn, mlp = layer.self_attn, layer.mlp
    d = attn.head_dim
    lq = lin if keep is None else lin_kept
    x = fused.rms_norm(layer.input_layernorm, h)
    q = None
    if not kv_only:
        xq = x if keep is None else x[keep]
        q = lq(attn.q_proj, xq).view(len(xq), -1, d)
    k = lin(attn.k_proj, x).view(len(x), -1, d)  # keys and values: every token
    v = lin(attn.v_proj, x).view(len(x), -1, d)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
        q, k = (None if q is None else fused.rms_norm(attn.q_norm, q)), fused.rms_norm(attn.k_norm, k)
    if q is not None:
        q = fused.rope(q, *((cos, sin) if keep is None else (cos[keep], sin[keep])))
    k = fused.rope(k, cos, sin)
    o = attend(q, k, v)
    if kv_only:
        return h
    if keep is not None:
        h = h[keep]
    h = h + lq(attn.o_proj, o)
    # the Llama-family MLP, down(act(gate(x)) * up(x)), written out so LoRA on its linears gets w too
    x = fused.rms_norm(layer.post_attention_layernorm, h)
    return h + lq(mlp.down_proj, fused.silu_mul(mlp.act_fn, lq(mlp.gate_proj, x), lq(mlp.up_proj, x)))


def layer_forward(layer, h, pk: Packing, cos, sin, keep=None, w_tok=None, merged=None):
    """One decoder layer on packed tokens h [N, D] -> [N, D], or [len(keep), D] for the kept tokens only.
    w_tok: per-token adapter weights [N, E], [E] or None (global)."""
    attn = layer.self_attn
    w_kept = w_tok if (keep is None or w_tok is None or w_tok.dim() == 1) else w_tok[keep]

    def attend(q, k, v):
        p = attn.attention_dropout if attn.training else 0.0
        if keep is None and pk.gather is None and p == 0.0 and packed_attention_available(q):
            # bf16 on a CPU: brgemm over the packed rows (thinkrec_kernels/cpu_attention.py), no padded grid
            o = packed_causal_attention(q, k, v, pk.offsets(), attn.scaling)
            return o.reshape(len(o), -1)
        K, V = _to_grid(k, pk), _to_grid(v, pk)
        if keep is None:
            o = _sdpa(_to_grid(q, pk), K, V, is_causal=True, dropout_p=p, scale=attn.scaling)
            return o.transpose(1, 2).reshape(pk.B * pk.L, -1)[pk.slot]
        # kept queries, grouped per row into [B, Q, ...]; query j of row b sees keys 0..pos_j
        krow, kpos = pk.row[keep], pk.pos[keep]
        counts = torch.bincount(krow, minlength=pk.B)
        nq = max(int(counts.max()), 1)
        qslot = krow * nq + torch.arange(len(keep), device=h.device) - (counts.cumsum(0) - counts)[krow]
        Q = q.new_zeros(pk.B * nq, *q.shape[1:]).index_copy(0, qslot, q).view(pk.B, nq, *q.shape[1:]).transpose(1, 2)
        qpos = torch.zeros(pk.B * nq, dtype=torch.long, device=h.device).index_copy(0, qslot, kpos)
        mask = torch.arange(pk.L, device=h.device)[None, :] <= qpos[:, None]  # [B * nq, L]; empty slots see key 0
        o = _sdpa(Q, K, V, attn_mask=mask.view(pk.B, 1, nq, pk.L), dropout_p=p, scale=attn.scaling)
        return o.transpose(1, 2).reshape(pk.B * nq, -1)[qslot]

    return decoder_layer(layer, h, cos, sin, attend, lambda mod, x: _linear(mod, x, w_tok, merged), keep,
                         lambda mod, x: _linear(mod, x, w_kept, merged))


def run_layers(layers, h, pk: Packing, cos, sin, w_tok=None, keep=None, grad_ckpt: bool = False, merged=None):
    """Decoder `layers` in order on packed h [N, D]. w_tok: per-token adapter weights [N, E], [E] or None
    (global). keep: packed indices (sorted, unique) to return from the last layer; None = all tokens.
    merged: {LoRALinear: nn.Linear} run in place of those modules."""
    for i, layer in enumerate(layers):
        kp = keep if i == len(layers) - 1 else None
        if grad_ckpt and torch.is_grad_enabled():
            h = checkpoint(layer_forward, layer, h, pk, cos, sin, kp, w_tok, merged, use_reentrant=False)
        else:
            h = layer_forward(layer, h, pk, cos, sin, kp, w_tok, merged)
    return h
