"""ThinkRecLM: the frozen causal LM with multi-adapter LoRA and the CF projector; returns hidden states.

    h = decoder(embed(input_ids) with placeholder rows := proj(cf_embeds))       h: [B, T, D]

The trainer turns h into the Yes-logit BCE and the answer LM loss with `lm_head_weight` [V, D] through
the kernels (`yes_head_bce`, `linear_cross_entropy`), so [B, T, V] logits are never built.

Per-row adapters: `forward(..., expert_weights=w)` with w [B, E] (E = 1 + n_experts, index 0 = global),
[E] for every row, or None for the global adapter alone. The weights are an argument of each call and
never stored in the model: the padding-free path gathers them per token and hands them to every linear
layer; the padded fallback broadcasts a row's weights over its T tokens (`lora.expert_weights`).

Padding-free (Llama-family models, thinkrec/model/packed.py): the decoder runs on the batch's real
tokens only, and `forward(..., select=(rows, cols))` returns just the states the losses read, which lets
the last layer skip every other position. Other architectures run Hugging Face's padded forward.
`run_layers` exposes a layer range (stage 3's frozen prefix, thinkrec/train/prefix.py).
"""

import torch
import torch.nn as nn

from .lora import LoRAConfig, adapter_names, checkpoint_context, expert_weights, init_experts_from_global
from .lora import inject_lora, last_layers, lora_modules, set_trainable
from . import fused
from .lowp import autocast
from .packed import Packing, packed_supported, run_layers
from .projector import CFProjector, scatter_placeholders
from .tokens import add_placeholder_tokens, answer_token_ids


class ThinkRecLM(nn.Module):
    def __init__(self, llm: nn.Module, *, n_experts: int = 0, lora: LoRAConfig = None, cf_dim: int = None,
                 projector_mid: int = 2560, cf_inputs: str = "emb", cf_slots: str = "all",
                 yes_token_id: int = None, no_token_id: int = None,
                 placeholder_token_ids: dict = None, base_model: str = "", mix: str = "delta"):
        super().__init__()
        self.llm = llm
        self.lora_config = lora or LoRAConfig()
        self.n_experts = n_experts
        self.base_model = base_model
        self.lora_paths = inject_lora(llm, self.lora_config, n_experts, mix)
        hidden = llm.config.hidden_size
        self.projector = CFProjector(cf_dim, hidden, projector_mid, cf_inputs, cf_slots) if cf_dim else None
        self.yes_token_id, self.no_token_id = yes_token_id, no_token_id
        self.placeholder_token_ids = dict(placeholder_token_ids or {})
        self.register_buffer("_ph_ids", torch.tensor(sorted(self.placeholder_token_ids.values()), dtype=torch.long),
                             persistent=False)
        self.unpacked_reason = packed_supported(llm.config)  # '' = padding-free forward available
        self.grad_ckpt = False
        self.precision = "fp32"  # thinkrec.precision.apply sets bf16 / int8

    def autocast(self):
        """The context the forward runs in for this model's precision (bf16: autocast; otherwise none).
        forward enters it itself; callers of the pieces (run_layers, embed) enter it around them."""
        return autocast(self.precision, self.lm_head_weight.device)

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, spec=None, *, n_experts: int = 0, lora: LoRAConfig = None, cf_dim: int = None,
                        dtype=torch.float32, device="cpu", cache=None, prompt_style: str = "ours", **kw):
        """(ThinkRecLM, tokenizer) for a model spec (see thinkrec.model.load); the tokenizer gets the
        placeholder tokens, and the Yes/No ids are the answer tokens of `prompt_style` (checked single):
        " Yes"/" No", or "Yes"/"No" for the official prompts (thinkrec.data.prompts.answer_text)."""
        from thinkrec.data.prompts import answer_text

        from .load import load_llm

        llm, tok, base = load_llm(spec, dtype=dtype, device=device, cache=cache)
        ph = add_placeholder_tokens(tok)
        yes, no = answer_token_ids(tok, yes=answer_text(1, prompt_style), no=answer_text(0, prompt_style))
        model = cls(llm, n_experts=n_experts, lora=lora, cf_dim=cf_dim, yes_token_id=yes, no_token_id=no,
                    placeholder_token_ids=ph, base_model=base, **kw)
        return model.to(device), tok

    # ---------------------------------------------------------------------------------------- adapters
    @property
    def n_adapters(self) -> int:
        return 1 + self.n_experts

    @property
    def adapter_names(self) -> list:
        return adapter_names(self.n_experts)

    def lora_layers(self) -> dict:
        """{path inside the HF model: LoRALinear}."""
        return lora_modules(self.llm)

    @property
    def packed(self) -> bool:
        return not self.unpacked_reason

    def set_trainable(self, layers=None, adapters=None, projector: bool = False) -> None:
        """LoRA of `layers` x `adapters` trains (None = all); the projector trains iff `projector`."""
        set_trainable(self.llm, layers, adapters)
        if self.projector is not None:
            self.projector.requires_grad_(projector)

    def last_layers(self, k: int) -> list:
        return last_layers(self.llm, k)

    def init_experts_from_global(self) -> None:
        init_experts_from_global(self.llm)

    def gradient_checkpointing(self, on: bool = True) -> None:
        """Recompute decoder layers in the backward (memory for time). Non-reentrant checkpointing,
        because the reentrant kind drops LoRA gradients when the layer inputs do not require grad
        (frozen embeddings in stage 1); its recompute re-enters the forward's expert weights."""
        self.grad_ckpt = on  # the padding-free path checkpoints each layer itself (packed.run_layers)
        if self.packed:
            return
        kw = {"use_reentrant": False, "context_fn": checkpoint_context}
        if hasattr(self.llm, "activation_checkpointing_enable"):  # transformers 5.x's name for it
            (self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw) if on
             else self.llm.activation_checkpointing_disable())
        elif on:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        else:
            self.llm.gradient_checkpointing_disable()

    # ----------------------------------------------------------------------------------------- forward
    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, D], frozen (tied to the input embeddings for SmolLM2)."""
        return self.llm.lm_head.weight

    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(input_ids, self._ph_ids.to(input_ids.device))

    def embed(self, input_ids, cf_embeds=None, placeholder_mask=None) -> torch.Tensor:
        """Token embeddings [B, T, D] with placeholder rows replaced by proj(cf_embeds [P, d_cf])."""
        mask = self.placeholder_mask(input_ids) if placeholder_mask is None else placeholder_mask
        has_slots = bool(mask.any())
        if has_slots and (cf_embeds is None or self.projector is None):
            raise ValueError("the input has placeholder tokens but "
                             + ("no cf_embeds were given" if self.projector is not None
                                else "the model was built without a CF projector (cf_dim=None)"))
        # placeholder ids may lie past the embedding table (see tokens.py): look up id 0 there instead
        safe_ids = input_ids.masked_fill(mask, 0) if has_slots else input_ids
        embeds = self.llm.get_input_embeddings()(safe_ids)
        if cf_embeds is None:
            return embeds
        return scatter_placeholders(embeds, mask, self.projector(cf_embeds))

    def forward(self, input_ids, attention_mask=None, cf_embeds=None, placeholder_mask=None, select=None,
                expert_weights=None, share=None):
        """Final hidden states (after the last norm): [B, T, D] (zeros at padding), or [S, D] at the grid
        positions select = (rows [S], cols [S]) (repeats allowed; padding positions are an error).

        input_ids: [B, T] (left- or right-padded), attention_mask: [B, T] 1 = token, cf_embeds: [P, d_cf]
        for the P placeholder positions in row-major order, placeholder_mask: [B, T] bool (default: from
        the ids), expert_weights: [B, E] per-row adapter weights, [E] for all rows, or None (global).
        Positions count real tokens only, so a row's result does not depend on its padding.
        share: (lead [B], n [B]): row b's first n_b tokens are row lead_b's and are computed once there
        (thinkrec/model/packed.py); cf_embeds then holds the slots of the tokens computed, i.e. none of the
        shared positions of the rows that are not leads. Padding-free models only.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with self.autocast():
            if not self.packed:
                if share is not None:
                    raise ValueError(f"shared prefixes need the padding-free forward: {self.unpacked_reason}")
                return self._forward_hf(input_ids, attention_mask, cf_embeds, placeholder_mask, select,
                                        expert_weights)
            pk = Packing.from_mask(attention_mask, share)
            h = self.embed_packed(pk, input_ids, cf_embeds, placeholder_mask)
            keep, inv = self.select_index(pk, select)
            h = self.run_layers(h, pk, 0, len(self.llm.model.layers), keep, expert_weights)
            return self.finish(h, pk, inv)

    # ------------------------------------------------------------------------- padding-free pieces
    def embed_packed(self, pk: Packing, input_ids, cf_embeds=None, placeholder_mask=None) -> torch.Tensor:
        """Embeddings [N, D] of the real tokens, placeholders filled (see embed)."""
        mask = None if placeholder_mask is None else pk.pack(placeholder_mask)
        return self.embed(pk.pack(input_ids), cf_embeds, mask)

    @staticmethod
    def select_index(pk: Packing, select):
        """(keep: sorted unique packed indices, inverse: position of each selected row in keep), or Nones."""
        if select is None:
            return None, None
        return torch.unique(pk.index(*select), sorted=True, return_inverse=True)

    def rope(self, pk: Packing, like: torch.Tensor):
        cos, sin = self.llm.model.rotary_emb(like, pk.pos[None])
        return cos[0], sin[0]

    def run_layers(self, h, pk: Packing, start: int, end: int, keep=None, expert_weights=None,
                   merged=None) -> torch.Tensor:
        """Decoder layers [start, end) on packed states h [N, D] with per-row adapter weights
        expert_weights ([B, E], [E] or None); with `keep`, the last of them computes only those tokens
        ([len(keep), D]); `merged` ({LoRALinear: nn.Linear}) runs those modules merged."""
        layers = list(self.llm.model.layers)[start:end]
        if not layers:
            return h if keep is None else h[keep]
        w = expert_weights
        if w is not None:
            w = w.to(h.device)
            if w.dim() == 2:
                w = w[pk.row]  # [B, E] -> [N, E], one row per token
        cos, sin = self.rope(pk, h)
        return run_layers(layers, h, pk, cos, sin, w, keep, grad_ckpt=self.grad_ckpt and self.training,
                          merged=merged)

    def finish(self, h, pk: Packing, inverse=None) -> torch.Tensor:
        """Final norm, then [B, T, D] (no selection) or the selected rows in the caller's order."""
        h = fused.rms_norm(self.llm.model.norm, h)
        return pk.unpack(h) if inverse is None else h[inverse]

    def _forward_hf(self, input_ids, attention_mask, cf_embeds, placeholder_mask, select, w=None):
        """Hugging Face's padded forward, for architectures without a padding-free path."""
        embeds = self.embed(input_ids, cf_embeds, placeholder_mask)
        # positions count real tokens only, so a left-padded row matches the same row unpadded
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with expert_weights(w):  # HF calls each projection with x alone
            out = self.llm.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False)
        h = out.last_hidden_state
        return h if select is None else h[select[0], select[1]]
