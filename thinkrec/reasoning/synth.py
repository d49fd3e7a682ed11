"""Reasoning traces for training: choose training samples, run the reflect loop on each through a teacher
with many requests in flight, and append every result to JSON Lines as it finishes.

    selection   errors: the training rows a trained model gets wrong (prob > 0.5 with label 0 or the reverse,
                        the official choice), from infer.py's scores.jsonl on the train split
                random: N training rows drawn with a seed           rows: the data rows listed in a file
    traces      RUN/reasoning/traces.jsonl   {"split", "row", "user_id", "item_id", "label", "reason", "rounds",
                                              "teacher", "usage"}; what train.py reads
    failures    <traces>.failures.jsonl      {"kind": "wrong" (never answered right) | "error" (teacher failed
                                              after its retries), "error", "last_answer", ...}

Resumable: a rerun with the same arguments skips rows with a trace or a "wrong" failure, asks again for
rows whose teacher failed ("error"), and a line cut by a kill is dropped (thinkrec.io.AppendLog), so no
sample is lost or written twice. Requests run in `concurrency` threads (the HTTP teacher is I/O-bound; a
local model serialises its calls itself).
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from tqdm.auto import tqdm

from thinkrec.data import prompts
from thinkrec.data.errors import DataError, json_lines
from thinkrec.data.history import build_histories
from thinkrec.data.prepared import SPLITS
from thinkrec.io import AppendLog

from .files import failures_path
from .reflect import Task, run_task

SELECT = ("errors", "random", "rows")


# ------------------------------------------------------------------------------------------- selection
def _check_train_row(train, row: int, where: str, hint: str = "") -> None:
    if not (0 <= row < len(train) and train[row]):
        raise DataError(f"{where}: row {row} is not a training row of this run's data{hint}")


def select_rows(prep, select: str, *, n: int = 0, seed: int = 0, scores=None, rows_file=None) -> np.ndarray:
    """Training data rows to ask the teacher about, in ascending order; n > 0 caps them (seeded draw)."""
    train = prep.inter.split == SPLITS.index("train")
    if select == "random":
        pool = np.flatnonzero(train)
    elif select == "errors":
        if scores is None:
            raise DataError("--select errors needs --scores FILE: infer.py's scores.jsonl on the train split "
                            "(python infer.py --run-dir RUN --stage stage2 --split train --max-rows 0 --out DIR)")
        pool = []
        for line_no, obj in json_lines(scores):
            try:
                row, prob, label = int(obj["row"]), float(obj["prob"]), obj["label"]
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{scores}:{line_no}: expected infer.py's score line with row, prob, label ({e})") \
                    from None
            _check_train_row(train, row, f"{scores}:{line_no}", " (score the train split: infer.py --split train)")
            if label is not None and (prob > 0.5) != bool(label):
                pool.append(row)
        pool = np.unique(np.asarray(pool, dtype=np.int64))
    elif select == "rows":
        if rows_file is None:
            raise DataError("--select rows needs --rows FILE (one data row per line, or JSON lines with \"row\")")
        pool = []
        with open(rows_file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                text = line.strip()
                if not text:
                    continue
                try:
                    row = int(json.loads(text)["row"]) if text.startswith("{") else int(text)
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(f"{rows_file}:{line_no}: not a row number ({e})") from None
                _check_train_row(train, row, f"{rows_file}:{line_no}")
                pool.append(row)
        pool = np.unique(np.asarray(pool, dtype=np.int64))
    else:
        raise DataError(f"--select {select!r} is not one of {SELECT}")
    if n and n < len(pool):
        pool = np.sort(np.random.default_rng(seed).choice(pool, size=n, replace=False))
    return np.asarray(pool, dtype=np.int64)


def make_tasks(prep, rows, keywords=None, hist_len: int = 10, noun: str | None = None, history: str = "strict") -> list:
    """One reflect-loop Task per data row: the C.2 first turn from the row's history (`history`: the rule the
    training prompts use, thinkrec.data.history) and its target."""
    inter = prep.inter
    hist = build_histories(inter.user, inter.timestamp, hist_len, history)
    noun = noun or prep.stats.get("noun") or prompts.NOUNS.get(prep.stats.get("dataset"), "item")
    tasks = []
    for r in np.asarray(rows).tolist():
        history = [(int(inter.item[h]), int(inter.label[h])) for h in hist[r] if h >= 0]
        target = int(inter.item[r])
        item = prep.items[target]
        tasks.append(Task("train", r, str(prep.users[inter.user[r]]), str(item["raw_id"]), int(inter.label[r]),
                          prompts.teacher_prompt(prep.items, history, target, noun, keywords),
                          f'"{item["title"]}"', noun))
    return tasks


# ------------------------------------------------------------------------------------------------ run
def synthesize(prep, rows, teacher, out, *, keywords=None, noun=None, history: str = "strict", concurrency: int = 16,
               max_rounds: int = 6, max_tokens: int = 1024, progress: bool = True, log=print) -> dict:
    """Run the reflect loop on every row not finished before; returns the summary (also logged)."""
    traces, failures = AppendLog(out), AppendLog(failures_path(out))
    done, wrong = traces.ints("row"), failures.ints("row", kind="wrong")
    todo = [r for r in np.asarray(rows).tolist() if r not in done and r not in wrong]
    if len(todo) < len(rows):
        log(f"continuing {out}: {len(rows) - len(todo)} of {len(rows)} samples finished before")
    tasks = make_tasks(prep, todo, keywords, noun=noun, history=history)
    stats0 = teacher.stats.snapshot()
    t0 = time.perf_counter()
    n_ok = n_wrong = n_err = rounds = 0
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    bar = tqdm(total=len(tasks), desc="traces", unit="sample", disable=not progress, mininterval=1.0)
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = [pool.submit(run_task, teacher, t, max_rounds, max_tokens) for t in tasks]
        for fut in as_completed(futures):
            res = fut.result()
            (traces if res.ok else failures).append(res.record)
            n_ok += res.ok
            n_wrong += (not res.ok) and res.record.get("kind") == "wrong"
            n_err += (not res.ok) and res.record.get("kind") == "error"
            rounds += res.rounds
            for k in usage:
                usage[k] += res.usage.get(k, 0)
            finished = n_ok + n_wrong + n_err
            bar.update(1)
            req_s = (teacher.stats.snapshot()["requests"] - stats0["requests"]) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(ok=f"{n_ok / finished:.0%}", rounds=f"{rounds / finished:.2f}", req_s=f"{req_s:.1f}")
    finally:  # Ctrl-C or a failed write: drop the samples not started; what finished is on disk
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    st = teacher.stats.snapshot()
    summary = {"teacher": teacher.name, "samples": len(rows), "finished_before": len(rows) - len(todo),
               "asked": len(tasks), "traces": n_ok, "wrong": n_wrong, "errors": n_err,
               "mean_rounds": round(rounds / max(len(tasks), 1), 3),
               "requests": st["requests"] - stats0["requests"], "retries": st["retries"] - stats0["retries"],
               **usage, "seconds": round(time.perf_counter() - t0, 1), "out": str(out)}
    log(f"traces: {n_ok} written, {n_wrong} never answered right, {n_err} teacher errors "
        f"({summary['requests']} requests, {summary['retries']} retries, {usage['prompt_tokens']} prompt + "
        f"{usage['completion_tokens']} completion tokens, {summary['mean_rounds']} rounds per sample) -> {out}")
    return summary
