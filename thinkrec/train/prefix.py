"""Stage 3's frozen prefix: decoder layers [0, L - k) run once, without autograd, on merged weights.

Only the LoRA of the last k layers trains in stage 3. In the layers below, every expert is still the
copy of the global adapter it started as (init_experts_from_global, and they never receive a gradient),
so for ANY routing weights w (one-hot or a mixture summing to 1):

    sum_e w_e B_e A_e = (sum_e w_e) B_0 A_0 = B_0 A_0       in every layer below L - k

and each LoRA layer there equals the plain linear layer with weight W + s B_0 A_0. `FrozenPrefix` builds
those merged linears once and swaps them in for the prefix forward, which runs under torch.no_grad: no
LoRA work, no saved activations, no graph. The top k layers then run with the rows' own adapter weights
and autograd. (Rounding: (W + sBA)x differs from Wx + sB(Ax) by float error only, ~1e-7 relative in fp32.)
LoRA dropout in the frozen layers is off; dropout of a frozen adapter only adds noise to the inputs of
the trainable layers.

If the lower experts differ from the global adapter (adapters loaded from elsewhere), merging is not
exact and the prefix runs the LoRA layers with the rows' weights instead, still without autograd.

Prefix cache (`cache_mb` > 0): the prefix output of a sample is a function of the sample alone for the
whole stage (frozen weights, no dropout), so with `keys` (one hashable per row, e.g. (set, data row)) the
[n_tokens, D] hidden states of each row's real tokens are kept and later epochs skip the prefix entirely:
a step then costs the top k layers' forward and backward only. Left padding makes a row's real-token
states independent of how much it was padded (positions count real tokens; padded keys are masked), so a
cached row is re-padded into any batch. Values equal a fresh computation up to float rounding (matmul
blocking depends on the batch shape), so a resumed run (empty cache) matches an uninterrupted one to
rounding, not bit for bit. Rows beyond `cache_mb` are computed every time.

The split reuses the Hugging Face decoder's own forward: `model.layers` is temporarily a ModuleList of
the lower (then upper) layers and `model.norm` an Identity for the prefix, so masks and rotary embeddings
are computed exactly as in one full pass.
"""

from contextlib import contextmanager

import torch
import torch.nn as nn

from thinkrec.model.lora import layer_index


@contextmanager
def _swapped(obj, **attrs):
    old = {k: getattr(obj, k) for k in attrs}
    try:
        for k, v in attrs.items():
            setattr(obj, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


class FrozenPrefix:
    """Runs ThinkRecLM with layers [0, L - k) frozen and merged, layers [L - k, L) trainable."""

    def __init__(self, lm, k_trainable: int, cache_mb: float = 0.0):
        self.lm = lm
        self.cache, self.cache_bytes, self.cache_limit = {}, 0, int(cache_mb * 2**20)
        self.hits = self.misses = 0
        decoder = lm.llm.model
        L = len(decoder.layers)
        if not 0 < k_trainable <= L:
            raise ValueError(f"thinkrec/train/prefix.py: k_trainable={k_trainable} must be in 1..{L}")
        self.split = L - k_trainable
        self.lower = nn.ModuleList(list(decoder.layers)[: self.split])
        self.upper = nn.ModuleList(list(decoder.layers)[self.split:])
        lower_lora = {p: m for p, m in lm.lora_layers().items() if (layer_index(p) or 0) < self.split}
        self.merged = {}
        if all(self._experts_equal_global(m) for m in lower_lora.values()):
            self.merged = {p: m.merge([1.0] + [0.0] * (m.n_adapters - 1)) for p, m in lower_lora.items()}
        for p in (q for m in lower_lora.values() for q in m.parameters()):
            if p.requires_grad:
                raise ValueError("thinkrec/train/prefix.py: a LoRA parameter below the trainable layers requires "
                                 "grad; call lm.set_trainable(layers=lm.last_layers(k), ...) first")

    @staticmethod
    def _experts_equal_global(mod) -> bool:
        return all(torch.equal(mod.lora_A[e], mod.lora_A[0]) and torch.equal(mod.lora_B[e], mod.lora_B[0])
                   for e in range(1, mod.n_adapters))

    @contextmanager
    def _merged_lower(self):
        """Swap the merged linears into the model for the duration of the prefix (restored after)."""
        llm, originals = self.lm.llm, {}
        try:
            for path, lin in self.merged.items():
                parent, _, child = path.rpartition(".")
                mod = llm.get_submodule(parent)
                originals[path] = getattr(mod, child)
                setattr(mod, child, lin)
            yield
        finally:
            for path, orig in originals.items():
                parent, _, child = path.rpartition(".")
                setattr(llm.get_submodule(parent), child, orig)

    def _prefix(self, input_ids, attention_mask, position_ids, cf_embeds, placeholder_mask):
        decoder = self.lm.llm.model
        with torch.no_grad():
            embeds = self.lm.embed(input_ids, cf_embeds, placeholder_mask)
            with self._merged_lower(), _swapped(decoder, layers=self.lower, norm=nn.Identity()):
                return decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state

    def _cached(self, keys, attention_mask):
        """[B, T, D] prefix output assembled from the cache (left-padded with zeros), or None on a miss."""
        if not all(k in self.cache for k in keys):
            return None
        first = self.cache[keys[0]]
        mid = first.new_zeros(*attention_mask.shape, first.shape[-1])
        for b, k in enumerate(keys):
            rows = self.cache[k]
            mid[b, attention_mask.shape[1] - rows.shape[0]:] = rows.to(mid.device)
        return mid

    def __call__(self, input_ids, attention_mask=None, cf_embeds=None, placeholder_mask=None, keys=None):
        """Final hidden states [B, T, D], same contract as ThinkRecLM.forward (expert weights already set).
        keys: one hashable per row naming the sample, for the prefix cache (None = no caching)."""
        decoder = self.lm.llm.model
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        use_cache = keys is not None and self.cache_limit > 0
        mid = self._cached(keys, attention_mask) if use_cache else None
        if mid is None:
            mid = self._prefix(input_ids, attention_mask, position_ids, cf_embeds, placeholder_mask)
            self.misses += len(input_ids)
            if use_cache:
                self._store(keys, attention_mask, mid)
        else:
            self.hits += len(input_ids)
        with _swapped(decoder, layers=self.upper):
            out = decoder(inputs_embeds=mid, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)
        return out.last_hidden_state

    def _store(self, keys, attention_mask, mid):
        n_real = attention_mask.sum(1).tolist()
        for b, k in enumerate(keys):
            if k in self.cache:
                continue
            rows = mid[b, mid.shape[1] - int(n_real[b]):].detach().clone()
            size = rows.numel() * rows.element_size()
            if self.cache_bytes + size > self.cache_limit:
                return
            self.cache[k] = rows
            self.cache_bytes += size
