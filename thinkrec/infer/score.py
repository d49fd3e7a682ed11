"""Batch scoring: Yes logits of many rows, each with its user's adapter weights, streamed to JSON Lines.

    plan:   rows sorted by prompt length, cut into batches of at most `max_rows` rows whose padded size
            (rows x longest prompt) stays within `batch_tokens`; users and routes mix freely in a batch
    batch:  one padding-free forward with per-row weights w [B, E]; only the Yes positions reach the last
            layer (`select`), and the score is h_yes . W_lm[Yes] (no vocabulary-sized logits)
    shared: rows whose prompts agree up to the target item (same tokens, CF slots and adapter weights: rows
            of one user with the same history, e.g. rated in one second) run that prefix once into a KV
            cache and only their suffixes (target, question tail) batched against it (thinkrec.model.cached);
            on the paper's ML-1M test split 7,331 rows have 5,141 distinct prefixes

The plan is a function of the prompt lengths alone, so a scoring job killed midway and started again with
the same arguments scores the same batches: `ScoreLog` appends each finished batch's lines to
`<out>.partial.jsonl`, and a rerun skips the rows already there (a batch cut in the middle by the kill is
scored again and only its missing rows are appended). The finished file is written in input order, in one
atomic rename, so a complete `scores.jsonl` is never half-written.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from thinkrec.io import (
    AppendLog,
    ArtifactError,
    atomic_file,
    read_json,
    to_json,
    write_json,
)
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
def score_samples(lm, samples: list, weights: torch.Tensor, user_emb=None, item_emb=None, pad_id: int = 0,
                  device="cpu") -> np.ndarray:
    """Yes logits [B] float64 of one batch: samples (thinkrec.data.tokenize.Sample, plain answers),
    weights [B, E] (each row its user's adapter weights), CF tables for the slots."""
    batch = collate(samples, np.zeros(len(samples), np.int64), pad_id).to(device)
    cf = cf_inputs(batch, user_emb, item_emb)
    h = lm(batch.input_ids, batch.attention_mask, cf_embeds=cf, placeholder_mask=batch.ph_mask,
           select=yes_positions(batch), expert_weights=weights.to(device))
    return yes_logits(h, lm.lm_head_weight, lm.yes_token_id, batch.yes_col).double().cpu().numpy()


@torch.no_grad()
def score_shared(lm, samples: list, cut: int, weights: torch.Tensor, user_emb=None, item_emb=None,
                 pad_id: int = 0) -> np.ndarray:
    """Yes logits [B] float64 of samples sharing input_ids[:cut] (tokens, CF slots) and adapter weights [E]:
    the prefix runs once into a KV cache, the B suffixes run batched against it (cached.extend, shared
    mode). Equal to scoring each sample alone (score_samples) up to float rounding."""

    s0 = samples[0]
    w = weights.reshape(1, -1)
    prefix = torch.as_tensor(s0.input_ids[:cut])[None]
    cache, _ = prefill(lm, prefix, expert_weights=w, cf_embeds=_slot_vectors(s0, s0.ph_pos < cut, user_emb, item_emb),
                       placeholder_mask=lm.placeholder_mask(prefix), kv_only_last=True)  # its outputs are unread
    suffixes = [s.input_ids[cut:] for s in samples]
    lens = torch.tensor([len(x) for x in suffixes])
    ids = torch.full((len(samples), int(lens.max())), pad_id, dtype=torch.long)
    for r, x in enumerate(suffixes):
        ids[r, :len(x)] = torch.as_tensor(x)
    cf = [_slot_vectors(s, s.ph_pos >= cut, user_emb, item_emb) for s in samples]
    cf = None if cf[0] is None else torch.cat(cf)
    h = extend(lm, cache, ids, lens, expert_weights=w[0], cf_embeds=cf,
               placeholder_mask=lm.placeholder_mask(ids) & (torch.arange(ids.shape[1]) < lens[:, None]), shared=True)
    return yes_logits(h, lm.lm_head_weight, lm.yes_token_id, lens - 1).double().cpu().numpy()  # last suffix token


def _slot_vectors(sample, sel, user_emb, item_emb):
    """CF vectors of a sample's slots at `sel` (a bool mask over its slots), or None."""
    return cf_vectors(sample.ph_kind[sel].astype(np.int64), sample.ph_index[sel], user_emb, item_emb)


@dataclass
class ScoreJob:
    """What to score: n rows, sample(i) builds row i's prompt, weights [n, E] its adapter weights."""

    sample: Callable[[int], object]
    lengths: np.ndarray  # [n] tokens per row (prompt + answer), for the plan
    weights: torch.Tensor  # [n, E]
    user_emb: torch.Tensor | None = None
    item_emb: torch.Tensor | None = None
    pad_id: int = 0
    # cut(sample, i) -> where row i's target item starts (PromptBuilder.target_start): rows agreeing before
    # it share one prefix run; None: every row alone (models without the KV-cached forward)
    cut: Callable[[object, int], int] | None = None

    def __len__(self) -> int:
        return len(self.lengths)


def plan_units(job: ScoreJob, batch_tokens: int = 8192, max_rows: int = 64) -> list:
    """[(row positions, cut)]: packed batches of rows scored alone (cut None, plan_batches), then the groups
    of rows sharing a prefix (cut = its length), each in chunks of max_rows. Deterministic in the job's
    prompts, so a resumed job replays the same units."""
    if job.cut is None:
        return [(b, None) for b in plan_batches(job.lengths, batch_tokens, max_rows)]
    groups = {}
    for i in range(len(job)):
        s = job.sample(i)
        c = job.cut(s, i)
        key = (s.input_ids[:c].tobytes(), s.ph_index[s.ph_pos < c].tobytes(), job.weights[i].numpy().tobytes())
        groups.setdefault(key, (c, []))[1].append(i)
    alone = np.array(sorted(m[0] for _, m in groups.values() if len(m) == 1), dtype=np.int64)
    units = [(alone[b], None) for b in plan_batches(job.lengths[alone], batch_tokens, max_rows)] if len(alone) else []
    for c, members in groups.values():
        if len(members) > 1:
            units += [(np.array(members[k:k + max_rows], dtype=np.int64), c) for k in range(0, len(members), max_rows)]
    return units


def run_job(lm, job: ScoreJob, batch_tokens: int = 8192, max_rows: int = 64, done: int = 0, on_batch=None,
            progress: bool = False, device="cpu", desc="score") -> np.ndarray:
    """Scores [n] float64 (NaN for rows skipped as done). The first `done` rows of the plan's order are
    skipped (a resumed job); on_batch(positions, scores) is called after each batch with its new rows."""
    was_training = lm.training
    lm.eval()
    out = np.full(len(job), np.nan)
    units = plan_units(job, batch_tokens, max_rows)
    seen = 0
    bar = tqdm(total=len(job), initial=min(done, len(job)), desc=desc, unit="row", disable=not progress,
               mininterval=1.0, smoothing=0.1)
    for idx, cut in units:
        if seen + len(idx) <= done:
            seen += len(idx)
            continue
        samples = [job.sample(int(i)) for i in idx]
        if cut is None:
            s = score_samples(lm, samples, job.weights[torch.as_tensor(idx)], job.user_emb, job.item_emb, job.pad_id,
                              device)
        else:
            s = score_shared(lm, samples, cut, job.weights[int(idx[0])], job.user_emb, job.item_emb, job.pad_id)
        skip = max(0, done - seen)  # a batch the kill cut in the middle: its first rows are written already
        seen += len(idx)
        out[idx[skip:]] = s[skip:]
        if on_batch is not None:
            on_batch(idx[skip:], s[skip:])
        bar.update(len(idx) - skip)
    bar.close()
    lm.train(was_training)
    return out


class ScoreLog:
    """`scores.jsonl` written as batches finish (into `scores.partial.jsonl`), resumable.

    `meta` (the arguments that decide what is scored) is stored beside the partial file; a rerun with other
    arguments is refused rather than mixing two jobs' rows. `finish(lines)` writes the final file in input
    order atomically and removes the partial one.
    """

    def __init__(self, path, meta: dict):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.stem + ".partial.jsonl")
        self.meta_path = self.path.with_name(self.path.stem + ".partial.json")
        self.meta = json.loads(to_json(meta))

    def start(self, overwrite: bool = False) -> dict:
        """{position: line dict} of rows already scored by an interrupted run with the same meta."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in (self.partial, self.meta_path):
                p.unlink(missing_ok=True)
        done = {}
        if self.meta_path.exists() and self.partial.exists():
            old = read_json(self.meta_path, f"delete {self.partial} to score from the start")
            if old != self.meta:
                diff = sorted(k for k in set(old) | set(self.meta) if old.get(k) != self.meta.get(k))
                raise ArtifactError(f"{self.partial} holds rows of a run with other arguments ({', '.join(diff)} "
                                    f"differ); rerun with the same arguments to continue it, or pass --overwrite")
            done = self._read_complete_lines()
        else:
            self.partial.unlink(missing_ok=True)
            write_json(self.meta_path, self.meta)
        return done

    def _read_complete_lines(self) -> dict:
        """Lines up to the last newline (a kill can cut the last one; it is dropped from the file too)."""
        done = {}
        for n, obj in enumerate(AppendLog(self.partial, "delete it or pass --overwrite").read(), 1):
            try:
                done[int(obj["pos"])] = obj
            except (KeyError, TypeError, ValueError) as e:
                raise ArtifactError(f"{self.partial}: record {n} is not a score line ({e}); delete the file or pass "
                                    "--overwrite") from None
        return done

    def append(self, lines: list) -> None:
        """One write of a batch's lines, flushed to disk before the next batch starts."""
        with open(self.partial, "a", encoding="utf-8") as f:
            f.write("".join(to_json(x) + "\n" for x in lines))
            f.flush()
            os.fsync(f.fileno())

    def finish(self, lines: list) -> None:
        with atomic_file(self.path) as f:
            for x in lines:
                f.write((to_json(x) + "\n").encode("utf-8"))
        self.partial.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)
