"""An offline teacher that says true things: reasoning traces written from facts in the training data.

NOT the paper's teacher. The paper's traces come from QwQ-32B reasoning over the prompt; a 135M local model
only restates the question (docs/results.md). This teacher counts instead, and writes what it counted:

    Yes. The user liked 7 of the 10 movies in their history. Among those sharing a genre with "Heat (1995)"
    (Action, Crime), they liked 3 of 4 Action and 1 of 1 Crime. Across all users, "Heat (1995)" was liked in
    68% of its 25 training ratings, against 57% for movies overall. So the user would likely enjoy it: Yes.

Each trace starts with the answer word (the Yes logit is read at the first answer position) and ends with it.
The verdict is the like-rate floor's (thinkrec.cf.likerate: the user's and the item's smoothed rates); as the
paper's reflect loop keeps only traces whose answer matches the label, a row where the counts point the
other way gets no trace (a "wrong" failure), so every trace's facts support its conclusion. Genres are the
comma-separated words of the item's description (ML-1M's genres; keywords elsewhere).
"""

import time

import numpy as np

from thinkrec.cf import likerate
from thinkrec.data.history import build_histories
from thinkrec.io import AppendLog

from .files import failures_path

NAME = "facts (offline, counts from the training data; not the paper's teacher)"


def _genres(item: dict) -> list:
    return [g.strip() for g in str(item.get("description") or "").split(",") if g.strip()]


def _pct(k: int, n: int) -> str:
    return f"{round(100 * k / n)}%" if n else "n/a"


def facts_trace(prep, row: int, history: list, rates: likerate.LikeRate, item_stats: tuple, noun: str) -> tuple:
    """(answer 0/1, trace text) for data row `row` with `history` [(item, label)]: the facts, then the verdict
    of the like-rate floor."""
    inter = prep.inter
    target = int(inter.item[row])
    item = prep.items[target]
    title = f'"{item["title"]}"'
    liked = sum(lab for _, lab in history)
    nouns = noun if len(history) == 1 else f"{noun}s"
    parts = [f"The user liked {liked} of the {len(history)} {nouns} in their history." if history
             else f"The user has no earlier {noun}s to go by."]
    genres = _genres(item)
    per = []
    for g in genres:
        seen = [lab for it, lab in history if g in _genres(prep.items[it])]
        if seen:
            per.append(f"{sum(seen)} of {len(seen)} {g}")
    if per:
        parts.append(f"Among those sharing a genre with {title} ({', '.join(genres)}), they liked {', '.join(per)}.")
    elif genres:
        parts.append(f"None of them shares a genre with {title} ({', '.join(genres)}).")
    likes, counts, overall = item_stats
    n_i = int(counts[target])
    parts.append(f"Across all users, {title} was liked in {_pct(int(likes[target]), n_i)} of its {n_i} training "
                 f"ratings, against {_pct(overall[0], overall[1])} for {noun}s overall." if n_i else
                 f"{title} has no training ratings from other users; {noun}s overall are liked "
                 f"{_pct(overall[0], overall[1])} of the time.")
    answer = int(rates.score([inter.user[row]], [target])[0] > 0.0)
    word = "Yes" if answer else "No"
    verdict = "would likely enjoy it" if answer else "would likely not enjoy it"
    return answer, f"{word}. " + " ".join(parts) + f" So the user {verdict}: {word}."


def synthesize_facts(prep, rows, out, *, noun: str, history: str = "strict", hist_len: int = 10, log=print) -> dict:
    """Write a facts trace for every row of `rows` whose counts support its label (others: "wrong" failures),
    appending to `out` as synthesize does (resumable: rows finished before are skipped)."""
    t0 = time.perf_counter()
    traces, failures = AppendLog(out), AppendLog(failures_path(out))
    done = traces.ints("row") | failures.ints("row", kind="wrong")
    todo = [r for r in np.asarray(rows).tolist() if r not in done]
    inter = prep.inter
    train = inter.of_split("train")
    rates = likerate.fit(prep)
    item_stats = (np.bincount(train.item, weights=train.label, minlength=prep.n_items).astype(np.int64),
                  np.bincount(train.item, minlength=prep.n_items), (int(train.label.sum()), len(train.label)))
    hist = build_histories(inter.user, inter.timestamp, hist_len, history)
    n_ok = 0
    for r in todo:
        h = [(int(inter.item[j]), int(inter.label[j])) for j in hist[r] if j >= 0]
        answer, text = facts_trace(prep, r, h, rates, item_stats, noun)
        record = {"split": "train", "row": int(r), "user_id": str(prep.users[inter.user[r]]),
                  "item_id": str(prep.items[int(inter.item[r])]["raw_id"]), "label": int(inter.label[r])}
        if answer == int(inter.label[r]):
            traces.append({**record, "reason": text, "rounds": 1, "teacher": NAME, "usage": {}})
            n_ok += 1
        else:
            failures.append({**record, "kind": "wrong", "error": "the counts point to the other answer",
                             "last_answer": text})
    summary = {"teacher": NAME, "samples": len(rows), "finished_before": len(rows) - len(todo), "asked": len(todo),
               "traces": n_ok, "wrong": len(todo) - n_ok, "errors": 0, "seconds": round(time.perf_counter() - t0, 2),
               "out": str(out)}
    log(f"traces: {n_ok} written, {len(todo) - n_ok} whose counts point the other way (no trace) -> {out}")
    return summary
