"""Stage 3's frozen prefix: decoder layers [0, L - k) run once, without autograd, on merged weights.

Only the LoRA of the last k layers trains in stage 3. In the layers below, every expert is still the
copy of the global adapter it started as (init_experts_from_global, and they never receive a gradient),
so for ANY routing weights w (one-hot or a mixture summing to 1):

    sum_e w_e B_e A_e = (sum_e w_e) B_0 A_0 = B_0 A_0       in every layer below L - k

and each LoRA layer there equals the plain linear layer with weight W + s B_0 A_0. `FrozenPrefix` builds
those merged linears once, owns them, and hands them to the layer-range forward (`merged`), which runs
under torch.no_grad: no LoRA work, no saved activations, no graph, and the model itself is never touched. The top k layers then run with the rows' own adapter weights
and autograd. (Rounding: (W + sBA)x differs from Wx + sB(Ax) by float error only, ~1e-7 relative in fp32.)
LoRA dropout in the frozen layers is off; dropout of a frozen adapter only adds noise to the inputs of
the trainable layers.

If the lower experts differ from the global adapter (adapters loaded from elsewhere), merging is not
exact and the prefix runs the LoRA layers with the rows' weights instead, still without autograd.

Prefix cache (`cache_mb` > 0): the prefix output of a sample is a function of the sample alone for the
whole stage (frozen weights, no dropout), so with `keys` (one hashable per row, e.g. (set, data row)) the
[n_tokens, D] hidden states of each row's real tokens are kept and later epochs skip the prefix entirely:
a step then costs the top k layers' forward and backward only. The forward is padding-free (positions
count real tokens), so a cached row equals a fresh computation up to float rounding: matmul blocking
depends on the batch shape (measured on SmolLM2-135M: up to 6e-5 apart for one row in two batches). For
bit-identical resumes the cache fills in batch order and closes at its first overflow (rows beyond
`cache_mb` are computed every time), so its content is a function of the batch order alone; a resumed
training loop replays the batches drawn before the kill through `warm` (thinkrec/train/loop.py).

Both parts run ThinkRecLM's padding-free layer range (`lm.run_layers`); models without that path
(thinkrec/model/packed.py) train stage 3 through the plain forward instead (stages.setup), where autograd
still records nothing below the first trainable layer.
"""

import torch

from thinkrec.model.lora import layer_index
from thinkrec.model.packed import Packing


class FrozenPrefix:
    """Runs ThinkRecLM with layers [0, L - k) frozen and merged, layers [L - k, L) trainable."""

    def __init__(self, lm, k_trainable: int, cache_mb: float = 0.0):
        if not lm.packed:
            raise ValueError(f"no padding-free forward for this model ({lm.unpacked_reason})")
        self.lm = lm
        self.cache, self.cache_bytes, self.cache_limit, self.full = {}, 0, int(cache_mb * 2**20), False
        self.hits = self.misses = 0
        L = len(lm.llm.model.layers)
        if not 0 < k_trainable <= L:
            raise ValueError(f"k_trainable={k_trainable} must be in 1..{L}")
        self.split, self.n_layers = L - k_trainable, L
        lower_lora = {p: m for p, m in lm.lora_layers().items() if (layer_index(p) or 0) < self.split}
        self.merged = {}  # {LoRALinear: nn.Linear with W + s B_0 A_0}, this object's own copies
        if all(self._experts_equal_global(m) for m in lower_lora.values()):
            self.merged = {m: m.merge() for m in lower_lora.values()}
        for p in (q for m in lower_lora.values() for q in m.parameters()):
            if p.requires_grad:
                raise ValueError("a LoRA parameter below the trainable layers requires grad; call "
                                 "lm.set_trainable(layers=lm.last_layers(k), ...) first")

    @staticmethod
    def _experts_equal_global(mod) -> bool:
        return all(torch.equal(mod.lora_A[e], mod.lora_A[0]) and torch.equal(mod.lora_B[e], mod.lora_B[0])
                   for e in range(1, mod.n_adapters))

    def _prefix(self, pk, input_ids, cf_embeds, placeholder_mask, expert_weights) -> torch.Tensor:
        """[N, D] packed output of layers [0, split), no autograd."""
        with torch.no_grad(), self.lm.autocast():
            h = self.lm.embed_packed(pk, input_ids, cf_embeds, placeholder_mask)
            return self.lm.run_layers(h, pk, 0, self.split, expert_weights=expert_weights, merged=self.merged)

    def __call__(self, input_ids, attention_mask=None, cf_embeds=None, placeholder_mask=None, select=None,
                 expert_weights=None, keys=None, share=None):
        """Same contract as ThinkRecLM.forward. keys: one hashable per row naming the sample, for the
        prefix cache (None = no caching); a batch with shared prefixes neither reads nor fills the cache
        (its rows do not own all their tokens)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pk = Packing.from_mask(attention_mask, share)
        mid = self._middle(pk, input_ids, cf_embeds, placeholder_mask, expert_weights,
                           keys if pk.gather is None else None)
        keep, inv = self.lm.select_index(pk, select)
        with self.lm.autocast():
            h = self.lm.run_layers(mid, pk, self.split, self.n_layers, keep, expert_weights)
            return self.lm.finish(h, pk, inv)

    def warm(self, input_ids, attention_mask, cf_embeds=None, placeholder_mask=None, expert_weights=None, keys=None):
        """Put the rows' prefix outputs into the cache as a forward would, computing nothing else."""
        self._middle(Packing.from_mask(attention_mask), input_ids, cf_embeds, placeholder_mask, expert_weights, keys)

    def _middle(self, pk, input_ids, cf_embeds, placeholder_mask, expert_weights, keys) -> torch.Tensor:
        """[N, D] output of layers [0, split): from the cache when it holds every row, else computed (and
        stored while the cache has room)."""
        if keys is not None and self.cache_limit > 0 and all(k in self.cache for k in keys):
            self.hits += len(keys)
            return torch.cat([self.cache[k].to(input_ids.device) for k in keys])
        mid = self._prefix(pk, input_ids, cf_embeds, placeholder_mask, expert_weights)
        self.misses += len(input_ids)
        if keys is not None and self.caching:
            self._store(keys, pk, mid)
        return mid

    @property
    def caching(self) -> bool:
        """Whether rows can still enter the cache."""
        return self.cache_limit > 0 and not self.full

    def _store(self, keys, pk, mid):
        for k, rows in zip(keys, torch.split(mid, pk.lengths.tolist())):
            if k in self.cache:
                continue
            size = rows.numel() * rows.element_size()
            if self.cache_bytes + size > self.cache_limit:
                # closed for good: what the cache holds then depends only on the order rows first came in
                self.full = True
                return
            self.cache[k] = rows.detach().clone()
            self.cache_bytes += size
