"""Rank many candidate items for one user with a shared prompt prefix.

A candidate's prompt is  prefix (instruction, history, user slot, question) + suffix (target title, its CF
slot, question tail, "#Answer:"); only the suffix depends on the candidate. The prefix runs once into a KV
cache, then the suffixes run in batches against it (thinkrec/model/cached.py, shared mode): per candidate
~30 tokens instead of ~200. The score is the Yes logit at the suffix's last token, the same number as
scoring the full prompt alone. Candidates whose prompt had to drop a different number of history items to
fit max_len (very long titles) get their own prefix group, so equality holds for every candidate.
"""

import time
from pathlib import Path

import numpy as np
import torch

from thinkrec.data import DataError
from thinkrec.data.errors import text_lines
from thinkrec.io import atomic_file, to_json
from thinkrec.scoring import score_shared

from .job import row_weights
from .run import LoadedRun


def user_history(prep, user: int, hist_len: int = 10) -> list:
    """[(item, label)] of the user's newest `hist_len` rows (all splits), oldest first."""
    inter = prep.inter
    rows = np.flatnonzero(inter.user == user)
    rows = rows[np.lexsort((rows, inter.timestamp[rows]))][-hist_len:]
    return list(zip(inter.item[rows].tolist(), inter.label[rows].astype(int).tolist()))


@torch.no_grad()
def rank_items(loaded: LoadedRun, user: int, items, mode: str = "reason", history=None, chunk: int = 64) -> np.ndarray:
    """Yes logits [len(items)] float64 of `items` for `user` (indices), with one shared prefix per group."""
    lm, builder = loaded.lm, loaded.builder(mode)
    history = user_history(loaded.prep, user) if history is None else history
    ue, ie = loaded.token_tables()
    w = row_weights(loaded, np.array([user]))[0]  # [E]
    samples = [builder.sample_for(user, int(i), history) for i in items]
    cuts = [builder.target_start(s, int(i)) for s, i in zip(samples, items)]
    groups = {}
    for c, (s, cut) in enumerate(zip(samples, cuts)):
        groups.setdefault(s.input_ids[:cut].tobytes(), []).append(c)
    out = np.zeros(len(items))
    for members in groups.values():
        for start in range(0, len(members), chunk):
            part = members[start:start + chunk]
            out[part] = score_shared(lm, [samples[c] for c in part], cuts[part[0]], w, ue, ie, loaded.tok.pad_token_id)
    return out


def read_candidates(spec: str, loaded: LoadedRun, user: int) -> np.ndarray:
    """Item indices: 'all' = every item the user has no row for; else a file with one raw item id per line
    (UTF-8; a BOM and CRLF accepted, blank lines skipped, as in every reader)."""
    prep = loaded.prep
    if spec == "all":
        seen = np.zeros(prep.n_items, bool)
        seen[prep.inter.item[prep.inter.user == user]] = True
        return np.flatnonzero(~seen)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--candidates {spec}: no such file (or 'all')")
    index = {it["raw_id"]: it["item"] for it in prep.items}
    out = []
    for line_no, line in text_lines(path):
        raw = line.strip()
        if raw not in index:
            raise DataError(f"{path}:{line_no}: unknown item id {raw!r}")
        out.append(index[raw])
    if not out:
        raise DataError(f"{path}: no candidate item ids")
    return np.array(out, np.int64)


def rank_cli(loaded: LoadedRun, args, mode: str, log) -> list:
    """--rank: top K candidates for --user as JSON Lines on stdout and in OUT/rank-<user>.jsonl."""
    users = {str(u): i for i, u in enumerate(loaded.prep.users)}
    if args.user not in users:
        raise DataError(f"--user {args.user!r}: not a user of {loaded.dir}")
    user = users[args.user]
    items = read_candidates(args.candidates, loaded, user)
    log(f"ranking {len(items)} candidates for user {args.user} (shared prefix, {mode} prompt)")
    t = time.perf_counter()
    scores = rank_items(loaded, user, items, mode)
    seconds = time.perf_counter() - t
    top = np.argsort(-scores, kind="stable")[: args.top]
    lines = [{"rank": r + 1, "user_id": args.user, "item_id": loaded.prep.items[items[c]]["raw_id"],
              "title": loaded.prep.items[items[c]]["title"], "score": float(scores[c])} for r, c in enumerate(top)]
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out / f"rank-{args.user}.jsonl") as f:
        f.write("".join(to_json(x) + "\n" for x in lines).encode())
    for x in lines:
        print(to_json(x), flush=True)
    log(f"{len(items)} candidates in {seconds:.1f} s ({len(items) / max(seconds, 1e-9):.1f} candidates/s)")
    return lines
