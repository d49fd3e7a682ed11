"""The batch scorer of training's evaluations and of infer.py: Yes logits of many rows, each with its own
adapter weights (or the model's global adapter).

    plan:   rows sorted by prompt length, cut into batches of at most `max_rows` rows whose padded size
            (rows x longest prompt) stays within `batch_tokens`; users and routes mix freely in a batch
            (training's evaluation: batches of `eval_batch_size` rows in length order, no token budget)
    batch:  one padding-free forward with per-row weights w [B, E]; only the Yes positions reach the last
            layer (`select`), and the score is h_yes . W_lm[Yes] (no vocabulary-sized logits)
    shared: rows whose prompts agree up to the target item (same tokens, CF slots and adapter weights: rows
            of one user with the same history, e.g. rated in one second) run that prefix once into a KV
            cache and only their suffixes (target, question tail) batched against it (thinkrec.model.cached);
            on the paper's ML-1M test split 7,331 rows have 5,141 distinct prefixes

The plan is a function of the prompt lengths alone, so a job killed midway and started again with the same
arguments scores the same batches (infer.py's ScoreLog skips the rows already written).
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from thinkrec.batches import cf_inputs, cf_vectors, collate, yes_logits, yes_positions
from thinkrec.model.cached import extend, prefill


def plan_batches(lengths, batch_tokens: int = 8192, max_rows: int = 64) -> list:
    """[array of row positions] in ascending length; each batch has <= max_rows rows and rows x longest
    <= batch_tokens (a row longer than the budget gets a batch of its own)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if batch_tokens < 1 or max_rows < 1:
        raise ValueError(f"batch_tokens ({batch_tokens}) and max_rows ({max_rows}) must be >= 1")
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    for end in range(1, len(order) + 1):
        size = end - start
        longest = lengths[order[end - 1]]
        if size > max_rows or (size > 1 and size * longest > batch_tokens):
            batches.append(order[start:end - 1])
            start = end - 1
    if start < len(order):
        batches.append(order[start:])
    return batches


@torch.no_grad()
def score_samples(lm, samples: list, weights: torch.Tensor | None, user_emb=None, item_emb=None, pad_id: int = 0,
                  device="cpu", forward=None) -> np.ndarray:
    """Yes logits [B] float64 of one batch: samples (thinkrec.data.tokenize.Sample, plain answers),
    weights [B, E] (each row its user's adapter weights; None: the model's global adapter), CF tables for the
    slots. forward: what runs the batch (default lm; stage 3's frozen prefix, same contract)."""
    batch = collate(samples, np.zeros(len(samples), np.int64), pad_id).to(device)
    cf = cf_inputs(batch, _on(user_emb, device), _on(item_emb, device))
    h = (forward or lm)(batch.input_ids, batch.attention_mask, cf_embeds=cf, placeholder_mask=batch.ph_mask,
                        select=yes_positions(batch), expert_weights=_on(weights, device))
    return yes_logits(h, lm.lm_head_weight, lm.yes_token_id, batch.yes_col).double().cpu().numpy()


def _on(t, device):
    return None if t is None else t.to(device)


@torch.no_grad()
def score_shared(lm, samples: list, cut: int, weights: torch.Tensor | None, user_emb=None, item_emb=None,
                 pad_id: int = 0, alone: bool = False) -> np.ndarray:
    """Yes logits [B] float64 of samples sharing input_ids[:cut] (tokens, CF slots) and adapter weights [E]:
    the prefix runs once into a KV cache, the B suffixes run batched against it (cached.extend, shared
    mode), or each by itself (`alone`: then a row's score is the same whichever rows share its prefix).
    Equal to scoring each sample alone (score_samples) up to float rounding. weights None: the global
    adapter."""
    s0 = samples[0]
    w = None if weights is None else weights.reshape(1, -1)
    prefix = torch.as_tensor(s0.input_ids[:cut])[None]
    cache, _ = prefill(lm, prefix, expert_weights=w, cf_embeds=_slot_vectors(s0, s0.ph_pos < cut, user_emb, item_emb),
                       placeholder_mask=lm.placeholder_mask(prefix), kv_only_last=True)  # its outputs are unread
    if alone and len(samples) > 1:
        return np.concatenate([_extend_scores(lm, cache, [s], cut, w, user_emb, item_emb, pad_id) for s in samples])
    return _extend_scores(lm, cache, samples, cut, w, user_emb, item_emb, pad_id)


def _extend_scores(lm, cache, samples, cut, w, user_emb, item_emb, pad_id) -> np.ndarray:
    """Yes logits of samples' suffixes (input_ids[cut:]) run batched against a 1-row prefix cache."""
    suffixes = [s.input_ids[cut:] for s in samples]
    lens = torch.tensor([len(x) for x in suffixes])
    ids = torch.full((len(samples), int(lens.max())), pad_id, dtype=torch.long)
    for r, x in enumerate(suffixes):
        ids[r, :len(x)] = torch.as_tensor(x)
    cf = [_slot_vectors(s, s.ph_pos >= cut, user_emb, item_emb) for s in samples]
    cf = None if cf[0] is None else torch.cat(cf)
    h = extend(lm, cache, ids, lens, expert_weights=None if w is None else w[0], cf_embeds=cf,
               placeholder_mask=lm.placeholder_mask(ids) & (torch.arange(ids.shape[1]) < lens[:, None]), shared=True)
    return yes_logits(h, lm.lm_head_weight, lm.yes_token_id, lens - 1).double().cpu().numpy()  # last suffix token


def _slot_vectors(sample, sel, user_emb, item_emb):
    """CF vectors of a sample's slots at `sel` (a bool mask over its slots), or None."""
    return cf_vectors(sample.ph_kind[sel].astype(np.int64), sample.ph_index[sel], user_emb, item_emb)


@dataclass
class ScoreJob:
    """What to score: n rows, sample(i) builds row i's prompt, weights [n, E] its adapter weights (None:
    every row on the model's global adapter)."""

    sample: Callable[[int], object]
    lengths: np.ndarray  # [n] tokens per row (prompt + answer), for the plan
    weights: torch.Tensor | None  # [n, E]
    user_emb: torch.Tensor | None = None
    item_emb: torch.Tensor | None = None
    pad_id: int = 0
    # cut(sample, i) -> where row i's target item starts (PromptBuilder.target_start): rows agreeing before
    # it share one prefix run; None: every row alone (models without the KV-cached forward)
    cut: Callable[[object, int], int] | None = None

    def __len__(self) -> int:
        return len(self.lengths)


def plan_units(job: ScoreJob, batch_tokens: int = 8192, max_rows: int = 64, alone: bool = False) -> list:
    """[(row positions, cut)]: packed batches of rows scored alone (cut None, plan_batches), then the groups
    of rows sharing a prefix (cut = its length), each in chunks of max_rows. Deterministic in the job's
    prompts, so a resumed job replays the same units. alone (run_job's batch-invariant plan): every row
    is a prefix and a suffix (a group of one too), or, without cuts, a batch of one."""
    if job.cut is None:
        return [(b, None) for b in plan_batches(job.lengths, batch_tokens, 1 if alone else max_rows)]
    groups = {}
    for i in range(len(job)):
        s = job.sample(i)
        c = job.cut(s, i)
        w = b"" if job.weights is None else job.weights[i].numpy().tobytes()
        key = (s.input_ids[:c].tobytes(), s.ph_index[s.ph_pos < c].tobytes(), w)
        groups.setdefault(key, (c, []))[1].append(i)
    single = np.array(sorted(m[0] for _, m in groups.values() if len(m) == 1 and not alone), dtype=np.int64)
    units = [(single[b], None) for b in plan_batches(job.lengths[single], batch_tokens, max_rows)] if len(single) else []
    for c, members in groups.values():
        if len(members) > 1 or alone:
            units += [(np.array(members[k:k + max_rows], dtype=np.int64), c) for k in range(0, len(members), max_rows)]
    return units


def run_job(lm, job: ScoreJob, batch_tokens: int = 8192, max_rows: int = 64, done: int = 0, on_batch=None,
            progress: bool = False, device="cpu", desc="score", units=None, forward=None,
            alone: bool = False) -> np.ndarray:
    """Scores [n] float64 (NaN for rows not scored). units: the plan (default plan_units(job, batch_tokens,
    max_rows, alone)); a rank of a distributed evaluation passes its share. The first `done` rows of the plan's
    order are skipped (a resumed job); on_batch(positions, scores) is called after each batch with its new rows.
    forward: what runs a batch of rows scored alone (default lm). alone: batch-invariant, each row's score a
    function of the row only (its prefix run, then its suffix by itself; int8, where fp32 rounding that
    differs with the batch's shape would flip quantisation steps), at the cost of batching."""
    was_training = lm.training
    lm.eval()
    out = np.full(len(job), np.nan)
    units = plan_units(job, batch_tokens, max_rows, alone) if units is None else units
    ue, ie = _on(job.user_emb, device), _on(job.item_emb, device)  # the CF tables move once, not per batch
    total = sum(len(idx) for idx, _ in units)
    seen = 0
    bar = tqdm(total=total, initial=min(done, total), desc=desc, unit="row", disable=not progress,
               mininterval=1.0, smoothing=0.1, leave=False)
    for idx, cut in units:
        if seen + len(idx) <= done:
            seen += len(idx)
            continue
        samples = [job.sample(int(i)) for i in idx]
        w = None if job.weights is None else job.weights[torch.as_tensor(idx)]
        if cut is None:
            s = score_samples(lm, samples, w, ue, ie, job.pad_id, device, forward)
        else:
            s = score_shared(lm, samples, cut, None if w is None else w[0], ue, ie, job.pad_id, alone)
        skip = max(0, done - seen)  # a batch the kill cut in the middle: its first rows are written already
        seen += len(idx)
        out[idx[skip:]] = s[skip:]
        if on_batch is not None:
            on_batch(idx[skip:], s[skip:])
        bar.update(len(idx) - skip)
    bar.close()
    lm.train(was_training)
    return out
