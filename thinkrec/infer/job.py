"""Score rows of a loaded run into OUT/scores.jsonl and OUT/metrics.json (what `python infer.py` and the end
of `python train.py` run).

scores.jsonl, one line per row in input order:
    {"pos", "row", "user_id", "item_id", "label", "score", "prob", "mf_score", "like_rate_score", "route", "weights"}
pos = the row's position in the input, row = its data row (-1 for --input rows), score = the Yes logit,
prob = sigmoid(score), mf_score = the run's CF model's logit for the same pair, like_rate_score = the like-rate
floor's logit (thinkrec.cf.likerate, fitted on the run's train split), route = global | expert_k
| mixture, weights = the adapter weights [global, expert_1, ...] the row was scored with.
"""

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from thinkrec.cf import likerate
from thinkrec.io import write_json
from thinkrec.metrics import evaluate
from thinkrec.scoring import ScoreJob, run_job

from .rows import Rows
from .run import LoadedRun, route_names
from .score import ScoreLog


def _extended(loaded: LoadedRun, rows: Rows):
    """(prep, user_emb, item_emb) with the unknown users / items of `rows` appended (zero CF vectors)."""
    prep, (ue, ie) = loaded.prep, loaded.token_tables()
    if rows.unknown_users:
        ue = torch.cat([ue, ue.new_zeros(len(rows.unknown_users), ue.shape[1])])
    if rows.unknown_items:
        items = list(prep.items) + [{"item": i, "raw_id": f"unknown:{i}", "title": title, "description": ""}
                                    for i, title in rows.unknown_items]
        prep = replace(prep, items=items)
        ie = torch.cat([ie, ie.new_zeros(len(rows.unknown_items), ie.shape[1])])
    return prep, ue, ie


def row_weights(loaded: LoadedRun, users: np.ndarray) -> torch.Tensor:
    """[n, E] gate weights per row; users past the run's table (unknown) get the global adapter."""
    table = torch.as_tensor(loaded.gate_weights, dtype=torch.float32)
    w = torch.zeros(len(users), table.shape[1])
    known = users < len(table)
    w[torch.as_tensor(known)] = table[torch.as_tensor(users[known])]
    w[torch.as_tensor(~known), 0] = 1.0
    return w


def score_rows(loaded: LoadedRun, rows: Rows, out_dir, prompt: str = "reason", batch_tokens: int = 8192,
               max_rows: int = 64, progress: bool = False, overwrite: bool = False, log=print, extra_meta=None,
               official_rows=None, share_prefix: bool = True) -> dict:
    """Score `rows` with the fused model; writes OUT/scores.jsonl (resumable) and OUT/metrics.json, returns
    the metrics. official_rows: (positions of `rows` forming the official evaluation sample, its label) or None.
    share_prefix: rows agreeing up to the target item run that prefix once (thinkrec.infer.score)."""
    out_dir = Path(out_dir)
    prep, user_emb, item_emb = _extended(loaded, rows)
    builder = loaded.builder(prompt, prep)
    weights = row_weights(loaded, rows.user)

    def sample(i):
        if rows.history is None:
            return builder.sample(int(rows.data_row[i]))
        return builder.sample_for(rows.user[i], rows.item[i], rows.history[i], max(int(rows.label[i]), 0))

    if rows.history is None:
        lengths = builder.lengths(rows.data_row)
    else:
        lengths = np.array([len(sample(i)) for i in range(len(rows))], np.int64)
    share = share_prefix and loaded.lm.packed  # the KV-cached forward needs a padding-free model type
    meta = {"run": str(loaded.dir.resolve()), "stage": loaded.stage.name, "source": rows.source, "rows": len(rows),
            "prompt": prompt, "mix": loaded.mix, "precision": loaded.lm.precision, "history": loaded.history,
            "titles": loaded.titles, "batch_tokens": batch_tokens, "max_rows": max_rows, "share_prefix": share,
            "row_checksum": _checksum(rows), **(extra_meta or {})}
    slog = ScoreLog(out_dir / "scores.jsonl", meta)
    done = slog.start(overwrite)
    if done:
        log(f"continuing {slog.partial}: {len(done)} of {len(rows)} rows scored before")
    user_ids = [str(u) for u in prep.users] + list(rows.unknown_users)
    item_ids = [it["raw_id"] for it in prep.items]
    routes = route_names(weights.numpy())
    mf = loaded.mf_scores(np.minimum(rows.user, len(loaded.cf["user_emb"]) - 1),
                          np.minimum(rows.item, len(loaded.cf["item_emb"]) - 1))
    known = (rows.user < len(loaded.cf["user_emb"])) & (rows.item < len(loaded.cf["item_emb"]))
    rates = likerate.fit(loaded.prep)  # the floor: the run's train-split like rates (milliseconds)
    floor = rates.score(rows.user, rows.item)
    w_list = np.round(weights.numpy().astype(np.float64), 6).tolist()

    def line(i, s):
        return {"pos": int(i), "row": int(rows.data_row[i]), "user_id": user_ids[rows.user[i]],
                "item_id": item_ids[rows.item[i]], "label": None if rows.label[i] < 0 else int(rows.label[i]),
                "score": float(s), "prob": float(1 / (1 + np.exp(-s))),
                "mf_score": float(mf[i]) if known[i] else None, "like_rate_score": float(floor[i]),
                "route": routes[i], "weights": w_list[i]}

    job = ScoreJob(sample, lengths, weights, user_emb, item_emb, loaded.tok.pad_token_id,
                   cut=(lambda s, i: builder.target_start(s, int(rows.item[i]))) if share else None)
    t = time.perf_counter()
    device = next(loaded.lm.parameters()).device
    alone = loaded.lm.precision == "int8"  # int8: each row's score a function of the row (scoring.run_job)
    scores = run_job(loaded.lm, job, batch_tokens, max_rows, done=len(done), progress=progress, device=device,
                     on_batch=lambda idx, s: slog.append([line(i, v) for i, v in zip(idx.tolist(), s.tolist())]),
                     alone=alone)
    seconds = time.perf_counter() - t
    for pos, obj in done.items():
        scores[pos] = obj["score"]
    slog.finish([line(i, scores[i]) for i in range(len(rows))])

    metrics = {"rows": len(rows), "source": rows.source, "prompt": prompt, "stage": loaded.stage.name,
               "mix": loaded.mix, "precision": loaded.lm.precision, "batch_invariant": alone, "history": loaded.history,
               "titles": loaded.titles, "routing": _route_counts(routes),
               "unknown": {"users": len(rows.unknown_users), "items": len(rows.unknown_items)},
               "rows_per_s": round((len(rows) - len(done)) / max(seconds, 1e-9), 2), "seconds": round(seconds, 2)}
    labelled = rows.label >= 0
    if labelled.any():
        metrics["like_rate_prior"] = rates.prior
        metrics["all"] = _metrics(f"every scored row ({rows.source})", rows, scores, mf, known, labelled, floor)
        if official_rows is not None:
            sel = np.zeros(len(rows), bool)
            sel[np.asarray(official_rows[0])] = True
            metrics["official_sample"] = _metrics(official_rows[1], rows, scores, mf, known, labelled & sel, floor)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def _metrics(label, rows, scores, mf, known, sel, floor) -> dict:
    """ThinkRec's metrics, the CF model's (rows with an unknown id have no CF score) and the like-rate floor's
    (thinkrec.cf.likerate; unknown ids count at the global rate) on the same rows."""
    m = {"label": label, "rows": int(sel.sum()), "thinkrec": evaluate(rows.user[sel], scores[sel], rows.label[sel])}
    both = sel & known
    m["cf"] = evaluate(rows.user[both], mf[both], rows.label[both]) if both.any() else None
    m["like_rate"] = evaluate(rows.user[sel], floor[sel], rows.label[sel])
    return m


def _route_counts(routes: list) -> dict:
    names, counts = np.unique(np.array(routes, dtype=object).astype(str), return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts)}


def _checksum(rows: Rows) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in (rows.user, rows.item, rows.label, rows.data_row):
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    if rows.history is not None:
        h.update(repr(rows.history).encode())
    return h.hexdigest()[:16]
