"""Batch scoring: Yes logits of many rows, each with its user's adapter weights, streamed to JSON Lines.

    plan:   rows sorted by prompt length, cut into batches of at most `max_rows` rows whose padded size
            (rows x longest prompt) stays within `batch_tokens`; users and routes mix freely in a batch
    batch:  one padding-free forward with per-row weights w [B, E]; only the Yes positions reach the last
            layer (`select`), and the score is h_yes . W_lm[Yes] (no vocabulary-sized logits)

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

from thinkrec.io import AppendLog, ArtifactError, atomic_file, read_json, to_json, write_json
from thinkrec.train.batches import cf_inputs, collate
from thinkrec.train.losses import yes_logits, yes_positions


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


@dataclass
class ScoreJob:
    """What to score: n rows, sample(i) builds row i's prompt, weights [n, E] its adapter weights."""

    sample: Callable[[int], object]
    lengths: np.ndarray  # [n] tokens per row (prompt + answer), for the plan
    weights: torch.Tensor  # [n, E]
    user_emb: torch.Tensor | None = None
    item_emb: torch.Tensor | None = None
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.lengths)


def run_job(lm, job: ScoreJob, batch_tokens: int = 8192, max_rows: int = 64, done: int = 0, on_batch=None,
            progress: bool = False, device="cpu", desc="score") -> np.ndarray:
    """Scores [n] float64 (NaN for rows skipped as done). The first `done` rows of the plan's order are
    skipped (a resumed job); on_batch(positions, scores) is called after each batch with its new rows."""
    was_training = lm.training
    lm.eval()
    out = np.full(len(job), np.nan)
    batches = plan_batches(job.lengths, batch_tokens, max_rows)
    seen = 0
    bar = tqdm(total=len(job), initial=min(done, len(job)), desc=desc, unit="row", disable=not progress,
               mininterval=1.0, smoothing=0.1)
    for idx in batches:
        if seen + len(idx) <= done:
            seen += len(idx)
            continue
        s = score_samples(lm, [job.sample(int(i)) for i in idx], job.weights[torch.as_tensor(idx)], job.user_emb,
                          job.item_emb, job.pad_id, device)
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
