"""Batched text generation with the KV cache (thinkrec/model/cached.py), each row keeping its own adapter
mixture at every step (its expert_weights row goes to every linear layer, for the prompt and for each
new token).

    prefill the right-padded prompts -> logits of each row's last prompt token -> pick -> extend by one
    token per row (S = 1) -> ...

Logits are h @ lm_head_weight.T for the B rows' last positions only. Repetition penalty, no-repeat-ngram,
temperature and top-p are transformers' own logits processors, run in HF generate's order. They see the
sequences so far [B, t] as HF generate gives them to a decoder-only model: prompt + generated tokens, so
the repetition penalty and the banned n-grams count the prompt too. Rows are laid out left-padded (the
prompts right-aligned, as HF's left padding). Padding gets the id V (= number of logits) and every CF
placeholder the id V + 1 (placeholder ids may lie past the vocabulary, see tokens.py), and the scores get
two extra -inf columns V, V + 1 that are dropped afterwards: so no gather/scatter goes out of range,
padding and placeholders are never penalised, padding starts no n-gram, and a placeholder acts as one
token that is never generated (an n-gram through it can only be banned while the last n - 1 tokens of
the sequence contain a placeholder, i.e. at the first steps after a prompt ending in a CF slot).
"""

import torch
from transformers import (LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopPLogitsWarper)

from .cached import extend, prefill


def _processors(temperature, top_p, repetition_penalty, no_repeat_ngram_size) -> LogitsProcessorList:
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: temperature {temperature} must be >= 0 and top_p {top_p} in (0, 1]")
    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
    if no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(int(no_repeat_ngram_size)))
    if temperature > 0:  # sampling; top-p cannot change a greedy pick
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(temperature)))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(float(top_p)))
    return procs


@torch.no_grad()
def generate(lm, input_ids, lengths, expert_weights=None, cf_embeds=None, placeholder_mask=None,
             max_new_tokens: int = 512, eos_token_id=None, temperature: float = 0.0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
             generator: torch.Generator | None = None) -> list:
    """New token ids per row, list[list[int]].

    input_ids: [B, T] right-padded prompts, lengths: [B] prompt lengths (>= 1), expert_weights: [B, E] per
    row ([E] all rows, None global), cf_embeds / placeholder_mask: the prompts' CF slots (as lm.forward).
    eos_token_id: int or list of ints; a row stops after producing one, and the EOS token is included as
    its last new token. Generation ends when every row stopped or after max_new_tokens tokens.
    temperature 0 = greedy, else sampling (torch.multinomial with `generator`, which must live on the
    model's device) from the processed distribution (top_p nucleus).
    """
    procs = _processors(temperature, top_p, repetition_penalty, no_repeat_ngram_size)
    eos = set() if eos_token_id is None else {int(e) for e in torch.as_tensor(eos_token_id).flatten().tolist()}
    B, T = input_ids.shape
    if B == 0 or max_new_tokens <= 0:
        return [[] for _ in range(B)]
    W = lm.lm_head_weight
    dev = W.device
    lengths = torch.as_tensor(lengths, dtype=torch.long).to(dev)
    input_ids = input_ids.to(dev)
    w = None if expert_weights is None else expert_weights.to(dev)
    # the last sampled token is never fed back, so max_new_tokens - 1 slots of room
    cache, h = prefill(lm, input_ids, lengths, w, cf_embeds, placeholder_mask, room=max_new_tokens - 1)
    h = h[torch.arange(B, device=dev), lengths - 1]  # [B, D] last prompt token

    V = W.shape[0]
    seq = None
    if procs:  # prompts right-aligned in [B, T] (HF's left padding); padding -> id V, CF placeholders -> V + 1
        ph = lm.placeholder_mask(input_ids) if placeholder_mask is None else placeholder_mask.to(dev).bool()
        ids = input_ids.masked_fill(ph | (input_ids >= V) | (input_ids < 0), V + 1)
        real = torch.arange(T, device=dev) < lengths[:, None]
        cols = torch.arange(T, device=dev) + (T - lengths)[:, None]  # prompt token s of row b -> s + T - len_b
        seq = torch.full((B, T), V, dtype=torch.long, device=dev)
        seq[real.nonzero(as_tuple=True)[0], cols[real]] = ids[real]

    rows = list(range(B))  # original row of each live cache row
    out = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        scores = (h @ W.T).float()  # [b, V]
        if procs:
            scores = procs(seq, torch.nn.functional.pad(scores, (0, 2), value=float("-inf")))[:, :V]
        if temperature > 0:
            tok = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(1)
        else:
            tok = scores.argmax(-1)
        live = []
        for i, t in enumerate(tok.tolist()):
            out[rows[i]].append(t)
            if t not in eos:
                live.append(i)
        if not live or step == max_new_tokens - 1:
            break
        if len(live) < len(rows):  # drop finished rows from the batch
            idx = torch.tensor(live, device=dev)
            cache, tok, rows = cache.select(idx), tok[idx], [rows[i] for i in live]
            w = w[idx] if w is not None and w.dim() == 2 else w
            seq = None if seq is None else seq[idx]
        if seq is not None:
            seq = torch.cat([seq, tok[:, None]], 1)
        h = extend(lm, cache, tok[:, None], torch.ones_like(tok), w, shared=False)[:, 0]
    return out
