"""Multi-adapter LoRA on a frozen linear layer, and its injection into a Hugging Face causal LM.

    y[m] = x[m] @ W.T + b + scale * sum_e w[m, e] * B_e @ A_e @ drop(x[m]),     scale = alpha / r
    x: [..., K], W: [N, K], b: [N] or None, A_e: [r, K], B_e: [N, r], w: [..., E]

E = n_experts + 1 adapters: index 0 is the global adapter, index n (1..N) is expert n. Each row of a
batch carries its own weights w[m, :] (one-hot for a single adapter, dense for a mixture), so rows of
different users share one pass (`thinkrec_kernels.lora_linear`).

The weights travel with the call, never in module state: `layer(x, w)`. Forwards we write ourselves
(thinkrec/model/packed.py, a decode loop) pass w down explicitly. Hugging Face's own forward calls each
projection with x alone, so for it (and only for it) `with expert_weights(w):` makes w the weights of
every LoRALinear called inside that block; w given to the call wins over the block's, and without either
the global adapter runs alone.

Each adapter's A_e and B_e are separate Parameters (stacked to [E, r, K] / [E, N, r] in the forward, a
copy of E*r*(K+N) numbers: 0.4 MB per layer at E=11, r=8, K=N=4096, against activations of MBs). The
alternative, one [E, r, K] tensor with a gradient hook zeroing frozen adapters, is not enough: AdamW's
decoupled weight decay (p -= lr * wd * p) and momentum left from earlier steps still move a "frozen"
slice whose gradient is zero. With separate Parameters a frozen adapter has requires_grad=False and is
never handed to the optimizer, so it cannot change (tests/test_model_lora.py checks this bit for bit).
"""

import contextlib
import contextvars
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from thinkrec_kernels import lora_linear, lora_mix
from thinkrec_kernels.dropout import draw_seed, philox_dropout, philox_keep, threshold

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_BLOCK_WEIGHTS = contextvars.ContextVar("thinkrec_expert_weights", default=None)


@contextlib.contextmanager
def expert_weights(w):
    """Inside this block every LoRALinear called without weights uses w ([E], [B, E] or None = global).
    For forwards that are not ours (Hugging Face's padded decoder); ours pass w to each call."""
    token = _BLOCK_WEIGHTS.set(w)
    try:
        yield
    finally:
        _BLOCK_WEIGHTS.reset(token)


def checkpoint_context():
    """torch.utils.checkpoint `context_fn`: the recompute in the backward runs outside the forward's
    `expert_weights` block, so it re-enters a block with the weights the forward saw."""
    return contextlib.nullcontext(), expert_weights(_BLOCK_WEIGHTS.get())


def dropout_keep(shape, p: float, device=None) -> tuple:
    """(keep [shape] bool, scale): the mask LoRADropout applies on a CPU when torch's generator is where it is
    now (it draws the same seed), for checks. p is rounded to a multiple of 1/65536 (0.05 -> 0.0500031) and
    scale = 1 / (1 - that p); see thinkrec_kernels/dropout.py."""
    cut, scale = threshold(p)
    return philox_keep(shape, draw_seed(), cut, device), scale


class LoRADropout(nn.Dropout):
    """nn.Dropout on a LoRA layer's input. On CPU its mask is Philox4x32-10 of (a seed drawn from torch's
    generator, element index), applied and regenerated in the backward by one C++ pass
    (thinkrec_kernels/dropout.py; forward + backward 4x faster than the randint mask it replaces,
    docs/architecture.md); elsewhere it is F.dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return philox_dropout(x, self.p)


@dataclass
class LoRAConfig:
    """LoRA shape; the defaults are the paper's (r=8, alpha=16, dropout 0.05 on q_proj and v_proj)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["q_proj", "v_proj"])

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def adapter_names(n_experts: int) -> list:
    """["global", "expert_1", ..., "expert_N"]: the name of each adapter index."""
    return ["global"] + [f"expert_{n}" for n in range(1, n_experts + 1)]


class LoRALinear(nn.Module):
    """A frozen linear layer (its own `weight`/`bias` Parameters, so state-dict keys stay those of the
    base model) plus E LoRA adapters `lora_A[e]` [r, K] and `lora_B[e]` [N, r].

    `forward(x, w)`: w is [E] (all rows), [B, E] (one per sequence, broadcast over the T tokens of
    x [B, T, K] without copying) or [..., E] matching x's leading dims; None means the enclosing
    `expert_weights` block's weights, or the global adapter alone (w = e_0).
    `mix` is "delta" (exact sum of deltas, default) or "linear" (peft's cross-term mix).
    """

    def __init__(self, base: nn.Linear, n_adapters: int, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, mix: str = "delta", dtype=torch.float32):
        super().__init__()
        if n_adapters < 1 or r < 1:
            raise ValueError(f"LoRALinear: n_adapters={n_adapters}, r={r} must be >= 1")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.mix = mix
        self.dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        self.int8 = None  # an int8 copy of the base layer (thinkrec.precision.quantize_frozen), forward only
        dev = base.weight.device
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=dtype)) for _ in range(n_adapters)])
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dtype)) for _ in range(n_adapters)])
        for A in self.lora_A:
            # standard LoRA init: A ~ kaiming-uniform(a=sqrt(5)) (nn.Linear's), B = 0 so the delta starts at 0
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))

    @property
    def n_adapters(self) -> int:
        return len(self.lora_A)

    def stacked(self, dtype=None, adapters=None):
        """(A [E, r, K], B [E, N, r]), differentiable into each adapter's Parameters; `adapters`: only these."""
        idx = range(self.n_adapters) if adapters is None else adapters
        A = torch.stack([self.lora_A[e] for e in idx])
        B = torch.stack([self.lora_B[e] for e in idx])
        return (A, B) if dtype is None else (A.to(dtype), B.to(dtype))

    def _row_weights(self, x: torch.Tensor, w) -> tuple:
        """(w [..., E'] for x's rows, the adapters it covers: None = all E, else their indices). One weight
        vector for every row (the global adapter, a block's [E] weights, on CPU) keeps only its nonzero and
        trainable adapters, so stages 1-2 compute one adapter's r columns, not E * r."""
        lead, E = x.shape[:-1], self.n_adapters
        if w is None:
            w = _BLOCK_WEIGHTS.get()
        if w is None:
            w = torch.zeros(E, device=x.device, dtype=x.dtype)
            w[0] = 1.0
        elif w.shape[-1] != E:
            raise ValueError(f"expert weights have {w.shape[-1]} columns, the layer has {E} adapters "
                             f"(global + experts)")
        w = w.to(device=x.device, dtype=x.dtype)
        if w.dim() == 1:
            if w.device.type == "cpu":  # (no device sync to read it) the nonzero adapters, and the trainable
                grad = torch.is_grad_enabled()  # ones, whose zero gradient keeps the loss on the graph
                active = [e for e, v in enumerate(w.tolist()) if v != 0 or (grad and self.lora_A[e].requires_grad)] or [0]
                w = w[active]
            return w.expand(*lead, len(w)), active
        if w.dim() == 2 and len(lead) == 2 and w.shape[0] == lead[0]:
            return w[:, None, :].expand(*lead, E), None  # [B, E] -> [B, T, E] view, stride 0 over T
        if tuple(w.shape[:-1]) != tuple(lead):
            raise ValueError(f"expert weights {tuple(w.shape)} do not fit the input {tuple(x.shape)} "
                             f"(want [E], [B, E] or x.shape[:-1] + (E,))")
        return w, None

    def forward(self, x: torch.Tensor, w: torch.Tensor = None) -> torch.Tensor:
        w, active = self._row_weights(x, w)
        A, B = self.stacked(x.dtype, active)
        if self.int8 is not None:  # --precision int8: int8 base GEMM, the LoRA delta in x's precision on top
            return self.int8(x) + lora_mix(x, A, B, w, self.scale, mix=self.mix)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            # no dropout: base GEMM and LoRA delta in one op, the delta added into y in place
            return lora_linear(x, self.weight, self.bias, A, B, w, self.scale, mix=self.mix)
        # dropout touches the LoRA input only (standard LoRA), so the base GEMM runs on the clean x
        return F.linear(x, self.weight, self.bias) + lora_mix(self.dropout(x), A, B, w, self.scale,
                                                               mix=self.mix)

    @torch.no_grad()
    def delta_weight(self, w) -> torch.Tensor:
        """[N, K] in the base weight's dtype: scale * sum_e w_e * B_e @ A_e (mix "delta"), or
        scale * (sum_e sqrt(w_e) B_e) @ (sum_e sqrt(w_e) A_e) (mix "linear")."""
        w = torch.as_tensor(w, dtype=torch.float64).flatten()
        if w.numel() != self.n_adapters:
            raise ValueError(f"delta_weight: w has {w.numel()} weights, the layer has {self.n_adapters} adapters")
        acc = self.lora_A[0].dtype
        if self.mix == "linear":
            A, B = self.stacked()
            sw = w.sqrt().to(acc)
            mixed = torch.einsum("e,enr->nr", sw, B) @ torch.einsum("e,erk->rk", sw, A)
            return (self.scale * mixed).to(self.weight.dtype)
        delta = torch.zeros(self.out_features, self.in_features, device=self.weight.device, dtype=acc)
        for e in range(self.n_adapters):
            if w[e] != 0:  # skip zero weights; with 1.0 * B exact, a one-hot merge is exactly B_e @ A_e
                delta += (float(w[e]) * self.lora_B[e]) @ self.lora_A[e]
        return (self.scale * delta).to(self.weight.dtype)

    @torch.no_grad()
    def merged_weight(self, w=None) -> torch.Tensor:
        """W + scale * sum_e w_e B_e A_e as a new tensor (W itself is not touched). w=None: global only."""
        if w is None:
            w = [1.0] + [0.0] * (self.n_adapters - 1)
        return self.weight + self.delta_weight(w)

    @torch.no_grad()
    def merge(self, w=None) -> nn.Linear:
        """A plain nn.Linear computing this layer with adapter weights w folded in; this module is unchanged."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.merged_weight(w))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        out.requires_grad_(False)
        return out

    @torch.no_grad()
    def init_experts_from_global(self) -> None:
        """Copy adapter 0 (global) into every expert 1..N (stage 3 starts from the stage-1 adapter)."""
        for e in range(1, self.n_adapters):
            self.lora_A[e].copy_(self.lora_A[0])
            self.lora_B[e].copy_(self.lora_B[0])

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, adapters={self.n_adapters}, r={self.r}, "
                f"alpha={self.alpha}, mix={self.mix}")


# ------------------------------------------------------------------------------------------- injection
def inject_lora(model: nn.Module, cfg: LoRAConfig, n_experts: int, mix: str = "delta") -> list:
    """Replace every nn.Linear whose name (last path component) is in cfg.target_modules with a
    LoRALinear holding 1 + n_experts adapters. Freezes all of `model`'s other parameters first.
    Returns the module paths replaced, in model order. Raises when no target module exists.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(name, mod) for name, mod in model.named_modules()
               if name.rsplit(".", 1)[-1] in cfg.target_modules and isinstance(mod, nn.Linear)]
    if not targets:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear named {cfg.target_modules} (LoRA target modules) in "
                         f"{type(model).__name__}; its linear layers are named {linear_names}")
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(mod, 1 + n_experts, cfg.r, cfg.alpha, cfg.dropout, mix))
    return [name for name, _ in targets]


def lora_modules(model: nn.Module) -> dict:
    """{module path: LoRALinear} in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def layer_index(path: str):
    """Decoder layer number in a module path ("model.layers.12.self_attn.q_proj" -> 12), or None."""
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


def set_trainable(model: nn.Module, layers=None, adapters=None) -> int:
    """LoRA Parameters train iff their decoder layer is in `layers` and their adapter index in `adapters`
    (None = all). E.g. stage 1: adapters=[0]; stage 3: layers=last_layers(model, 8), adapters=1..N.
    Returns the number of trainable LoRA numbers. Base weights stay frozen.
    """
    layers = None if layers is None else {int(i) for i in layers}
    adapters = None if adapters is None else {int(i) for i in adapters}
    count = 0
    for path, mod in lora_modules(model).items():
        in_layer = layers is None or layer_index(path) in layers
        for e in range(mod.n_adapters):
            on = in_layer and (adapters is None or e in adapters)
            for p in (mod.lora_A[e], mod.lora_B[e]):
                p.requires_grad_(on)
                count += p.numel() if on else 0
    return count


def last_layers(model: nn.Module, k: int) -> list:
    """Indices of the last k decoder layers that hold LoRA modules."""
    idx = sorted({layer_index(p) for p in lora_modules(model)} - {None})
    return idx[-k:] if k > 0 else []


def init_experts_from_global(model: nn.Module) -> None:
    for mod in lora_modules(model).values():
        mod.init_experts_from_global()


@torch.no_grad()
def merge_lora(model: nn.Module, w=None) -> nn.Module:
    """Replace every LoRALinear of `model` (in place) by a plain nn.Linear with weights W + scale *
    sum_e w_e B_e A_e; returns `model`. Deep-copy first to keep the LoRA model."""
    for path, mod in lora_modules(model).items():
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, mod.merge(w))
    return model
