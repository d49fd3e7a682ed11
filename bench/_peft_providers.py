"""The peer implementations the scoring benchmark compares ThinkRec's scorer against, both on peft.

    pm = to_peft(lm)                                   # peft copy of lm.llm, one LoRA per adapter name
    official_scores(pm, lm, samples, users, weights, user_emb, item_emb, pad_id)   # the official way
    names = prepare_mixtures(pm, lm, weights)          # peft mixed batches: one adapter per mixture ...
    peft_mixed_scores(pm, lm, samples, users, weights, user_emb, item_emb, pad_id, adapter_names=names)

Both return the score of each row in the caller's order: the raw logit of " Yes" (lm.yes_token_id) at the
prompt's last position, i.e. the logit predicting the token after the prompt. Inputs are what the
trainer's scorer sees: `Sample`s (thinkrec.data.tokenize), their users [n] and the adapter weights of each
row [n, E] (E = 1 + n_experts, columns in lm.adapter_names order), plus the CF tables for the placeholder
slots (None without a projector). Only the first answer token of a sample is kept, so the model input is
exactly the prompt (collate feeds prompt + answer[:-1]).

How the peers behave (peft 0.21, transformers 5.x):

- official: the official ThinkRec evaluation builds, per user, a weighted adapter with
  `add_weighted_adapter(..., combination_type="linear")`, activates it and calls `generate` on left-padded
  batches of that user's rows. peft's "linear" combination is NOT the mixture sum_e w_e B_e A_e: it builds
  A' = sum_e sqrt(w_e * s_e) A_e and B' = sum_e sqrt(w_e * s_e) B_e (s_e = alpha / r of adapter e, the
  new adapter gets lora_alpha = r, so its own scaling is 1), whose product has the cross terms B_i A_j.
  ThinkRec's LoRALinear with mix="linear" computes the same s * (sum sqrt(w) B)(sum sqrt(w) A).
  `generate` derives position ids from the attention mask (cumsum - 1), so left padding does not shift
  positions; the score is the first step's raw logits (`output_logits`), not the processed `scores`.
- mixed batch: peft's `forward(..., adapter_names=[one name per row])` runs, in every LoRA layer, the base
  layer on the whole batch, then each distinct adapter on the sub-batch of its rows (gather, LoRA, add
  back). A row with a mixture of adapters needs a materialised adapter of its own (peft cannot mix per
  row), so `prepare_mixtures` creates one weighted ("linear") adapter per distinct mixture up front; a
  benchmark times it separately from the forward. peft/transformers do not derive position ids from the
  mask in a plain forward (Llama numbers positions 0..T-1, padding included), so we pass cumsum(mask) - 1
  ourselves, as generate does. With RoPE that only matters to float noise (a constant shift of a row's
  positions leaves q.k unchanged; measured 7e-8 on the tiny test model), for other position schemes it
  is exact.
"""

import copy
import dataclasses
import hashlib

import numpy as np
import torch

from thinkrec.model.lora import lora_modules, merge_lora
from thinkrec.batches import cf_inputs, collate


# ------------------------------------------------------------------------------------------ the model
@torch.no_grad()
def to_peft(lm):
    """A peft.PeftModel over a deep copy of lm.llm: every LoRALinear replaced by a plain nn.Linear with the
    base weights (W exactly: merging all-zero adapter weights adds nothing), then one peft LoRA adapter
    per name in lm.adapter_names (same r, alpha, target modules; dropout 0) holding lm's A/B weights.
    Eval mode, no gradients; the active adapter is "global". lm is not changed."""
    from peft import LoraConfig, get_peft_model

    c = lm.lora_config
    base = merge_lora(copy.deepcopy(lm.llm), [0.0] * lm.n_adapters)
    cfg = LoraConfig(r=c.r, lora_alpha=c.alpha, target_modules=list(c.target_modules), lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM", init_lora_weights=False, use_rslora=False)
    names = lm.adapter_names
    pm = get_peft_model(base, cfg, adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, cfg)
    # peft wraps the same module paths: base_model.model.<path inside the HF model>
    peft_layers = {path: mod for path, mod in pm.base_model.model.named_modules() if hasattr(mod, "lora_A")}
    for path, mod in lora_modules(lm.llm).items():
        target = peft_layers[path]
        for e, name in enumerate(names):
            target.lora_A[name].weight.copy_(mod.lora_A[e])
            target.lora_B[name].weight.copy_(mod.lora_B[e])
    pm.set_adapter(names[0])
    pm.eval()
    pm.requires_grad_(False)
    return pm


# ------------------------------------------------------------------------------------- shared pieces
def _one_adapter(w):
    """Index e when the row's weights are exactly e_e (one adapter at weight 1), else None."""
    nz = np.flatnonzero(w)
    return int(nz[0]) if len(nz) == 1 and w[nz[0]] == 1.0 else None


def _mixture_name(prefix, w):
    """A peft adapter name determined by the weights (add_weighted_adapter silently returns when the
    name exists, so the name must not be reused for other weights)."""
    return f"{prefix}_{hashlib.sha1(np.ascontiguousarray(w, dtype=np.float64).tobytes()).hexdigest()[:16]}"


def _add_linear_mixture(pm, lm, w, name):
    """add_weighted_adapter(combination "linear") of the adapters with nonzero weight."""
    names = lm.adapter_names
    nz = np.flatnonzero(w)
    if len(nz) == 0:
        raise ValueError("a row's adapter weights are all zero")
    if (w < 0).any():
        raise ValueError(f"negative adapter weights {w.tolist()} (ThinkRec's mixtures are >= 0)")
    pm.add_weighted_adapter(adapters=[names[e] for e in nz], weights=[float(w[e]) for e in nz],
                            adapter_name=name, combination_type="linear")
    pm.eval()  # the injected modules are created in training mode


def _check_inputs(lm, samples, users, weights):
    users = np.asarray(users)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(samples), lm.n_adapters) or len(users) != len(samples):
        raise ValueError(f"{len(samples)} samples need users [{len(samples)}] and weights "
                         f"[{len(samples)}, {lm.n_adapters}]; got {users.shape}, {weights.shape}")
    return users, weights


def _inputs(lm, samples, users, user_emb, item_emb, pad_id):
    """(inputs_embeds [B, T, D], attention_mask [B, T], yes_col [B]) for a left-padded batch of prompts."""
    samples = [dataclasses.replace(s, answer_ids=np.asarray(s.answer_ids)[:1]) for s in samples]
    dev = lm.lm_head_weight.device
    batch = collate(samples, users, pad_id).to(dev)
    cf = cf_inputs(batch, None if user_emb is None else user_emb.to(dev), None if item_emb is None else item_emb.to(dev))
    # lm.embed reads lm.llm's embedding table; the peft copy's is an identical copy (not a LoRA target)
    embeds = lm.embed(batch.input_ids, cf, batch.ph_mask)
    return embeds, batch.attention_mask, batch.yes_col


# ------------------------------------------------------------------------------ the official evaluation
@torch.no_grad()
def official_scores(pm, lm, samples, users, weights, user_emb, item_emb, pad_id, batch_size=2,
                    max_new_tokens=16) -> np.ndarray:
    """Scores [n] float64 the official ThinkRec way: per user (first-appearance order), activate the user's
    adapter (one-hot: that adapter; mixture: a temporary add_weighted_adapter "linear" adapter, deleted
    afterwards), then greedy `generate` on left-padded batches of `batch_size` of the user's rows; the score
    is the Yes logit of the first generated step. All rows of a user must carry the same weights."""
    users, weights = _check_inputs(lm, samples, users, weights)
    out = np.empty(len(samples), dtype=np.float64)
    names = lm.adapter_names
    for u in dict.fromkeys(users.tolist()):  # distinct users, first-appearance order
        rows = np.flatnonzero(users == u)
        w = weights[rows[0]]
        if not (weights[rows] == w).all():
            raise ValueError(f"user {u}: rows carry different adapter weights; the official evaluation "
                             f"sets one adapter per user")
        e = _one_adapter(w)
        temp = None
        if e is not None:
            pm.set_adapter(names[e])
        else:
            name = _mixture_name("user_mix", w)
            if name not in pm.peft_config:  # made here, so removed here
                _add_linear_mixture(pm, lm, w, name)
                temp = name
            pm.set_adapter(name)
        try:
            for lo in range(0, len(rows), batch_size):
                chunk = rows[lo:lo + batch_size]
                embeds, mask, _ = _inputs(lm, [samples[i] for i in chunk], users[chunk], user_emb, item_emb, pad_id)
                # generate computes position_ids = cumsum(mask) - 1 from the 2-D mask (left padding safe).
                # logits[0]: the raw logits of the first new token (scores[0] would be after logits
                # processors, which greedy decoding without penalties leaves unchanged anyway).
                gen = pm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  do_sample=False, output_scores=True, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=pad_id)
                out[chunk] = gen.logits[0][:, lm.yes_token_id].double().cpu().numpy()
        finally:
            if temp is not None:
                pm.set_adapter(names[0])
                pm.delete_adapter(temp)
    return out


# ------------------------------------------------------------------------------ peft mixed batches
@torch.no_grad()
def prepare_mixtures(pm, lm, weights) -> list:
    """Adapter name per row for `peft_mixed_scores`: lm.adapter_names[e] for one-hot rows; for rows with a
    mixture, an adapter made here by add_weighted_adapter (combination "linear"), one per distinct mixture
    (named by a hash of the weights, so calling this again reuses them). This is the preparation peft's
    mixed-batch inference needs before any forward; a benchmark times it apart from the scoring."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != lm.n_adapters:
        raise ValueError(f"weights must be [n, {lm.n_adapters}], got {weights.shape}")
    out = []
    for w in weights:
        e = _one_adapter(w)
        if e is not None:
            out.append(lm.adapter_names[e])
            continue
        name = _mixture_name("mix", w)
        if name not in pm.peft_config:
            _add_linear_mixture(pm, lm, w, name)
        out.append(name)
    return out


@torch.no_grad()
def peft_mixed_scores(pm, lm, samples, users, weights, user_emb, item_emb, pad_id, batch_size=16,
                      adapter_names=None) -> np.ndarray:
    """Scores [n] float64 with peft's mixed-batch inference: consecutive rows in batches of `batch_size`,
    left-padded, one forward `pm(inputs_embeds, attention_mask, position_ids, adapter_names=[per row])`
    producing full logits [B, T, V]; the score is the Yes logit at each row's last prompt position.
    adapter_names: from prepare_mixtures (default: prepared here, inside the call)."""
    users, weights = _check_inputs(lm, samples, users, weights)
    if adapter_names is None:
        adapter_names = prepare_mixtures(pm, lm, weights)
    if len(adapter_names) != len(samples):
        raise ValueError(f"{len(adapter_names)} adapter names for {len(samples)} rows")
    out = np.empty(len(samples), dtype=np.float64)
    for lo in range(0, len(samples), batch_size):
        hi = min(lo + batch_size, len(samples))
        embeds, mask, yes_col = _inputs(lm, samples[lo:hi], users[lo:hi], user_emb, item_emb, pad_id)
        # a plain forward numbers positions 0..T-1 including the padding: give real-token positions
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = pm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                    adapter_names=list(adapter_names[lo:hi]), use_cache=False).logits  # [B, T, V]
        rows = torch.arange(hi - lo, device=logits.device)
        out[lo:hi] = logits[rows, yes_col, lm.yes_token_id].double().cpu().numpy()
    return out
