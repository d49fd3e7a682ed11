"""Rows to score: a split of the run's data, or rows a user brings as JSON Lines.

Input file (`--input rows.jsonl`), one object per line:

    {"user_id": "42", "item_id": "1193", "label": 1, "timestamp": 978300760,
     "history": [{"item_id": "661", "label": 1}, ...]}

`label`, `timestamp` and `history` are optional. Ids are the dataset's own (raw) ids, compared as strings.
Without `history`, the user's history comes from the run's data: their rows before `timestamp` (all of
them without one), newest `hist_len` kept, oldest first. Every line is checked before anything is scored:
a malformed line, a bad label or an unknown id is an error naming the file and line; with
`allow_unknown`, an unknown user gets the global adapter and a zero CF vector, an unknown item a zero CF
vector and its "title" (or its id) as title, and they are counted.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from thinkrec.data.errors import DataError, json_lines, malformed
from thinkrec.data.prepared import SPLITS
from thinkrec.data.sampler import subsample


@dataclass
class Rows:
    """n rows: user / item indices (past the run's tables for unknown ids), label (-1 unknown), history
    [(item, label)] per row (None = the data row's own history), data row index (-1 for input rows)."""

    user: np.ndarray
    item: np.ndarray
    label: np.ndarray
    history: list | None = None
    data_row: np.ndarray | None = None
    unknown_users: list = field(default_factory=list)  # raw ids added past the run's users
    unknown_items: list = field(default_factory=list)  # (raw id, title)
    source: str = ""

    def __len__(self) -> int:
        return len(self.user)


def split_rows(prep, split: str, max_rows: int = 0, seed: int = 0, rows=None) -> Rows:
    """Rows of a data split (all, or `max_rows` of them drawn as train.py draws its test rows)."""
    if split not in SPLITS:
        raise DataError(f"--split {split!r}: choose one of {SPLITS}")
    idx = np.flatnonzero(prep.inter.split == SPLITS.index(split)) if rows is None else np.asarray(rows)
    idx = subsample(idx, max_rows, seed)
    return Rows(prep.inter.user[idx], prep.inter.item[idx], prep.inter.label[idx].astype(np.int64), None, idx,
                source=f"{split} split")


def _label(value, path, line_no) -> int:
    """0 / 1 (JSON numbers), -1 when absent."""
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
        raise malformed(path, line_no, f"label must be 0 or 1, got {value!r}")
    return int(value)


def read_input(path, prep, hist_len: int = 10, allow_unknown: bool = False, max_rows: int = 0) -> Rows:
    """Read and check `--input`; see the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--input {path}: no such file")
    users = {str(u): i for i, u in enumerate(prep.users)}
    items = {it["raw_id"]: it["item"] for it in prep.items}
    new_users, new_items = {}, {}
    inter = prep.inter
    by_user = {}  # user index -> data rows sorted by time (built on first use)
    out_u, out_i, out_y, out_h = [], [], [], []

    def user_index(raw, line_no):
        if raw in users:
            return users[raw]
        if not allow_unknown:
            raise malformed(path, line_no, f"unknown user_id {raw!r} (not in the run's data; --allow-unknown "
                                           "scores it with the global adapter and a zero CF vector)")
        return new_users.setdefault(raw, prep.n_users + len(new_users))

    def item_index(raw, title, line_no):
        if raw in items:
            return items[raw]
        if not allow_unknown:
            raise malformed(path, line_no, f"unknown item_id {raw!r} (not in the run's data; --allow-unknown "
                                           "scores it with a zero CF vector and the line's \"title\")")
        if raw not in new_items:
            new_items[raw] = (prep.n_items + len(new_items), str(title or raw))
        return new_items[raw][0]

    for line_no, obj in json_lines(path):
        if not isinstance(obj, dict) or "user_id" not in obj or "item_id" not in obj:
            raise malformed(path, line_no, 'expected an object with "user_id" and "item_id"')
        u = user_index(str(obj["user_id"]), line_no)
        i = item_index(str(obj["item_id"]), obj.get("title"), line_no)
        y = _label(obj.get("label"), path, line_no)
        hist = obj.get("history")
        if hist is not None:
            if not isinstance(hist, list) or not all(isinstance(h, dict) and "item_id" in h for h in hist):
                raise malformed(path, line_no, 'history must be a list of {"item_id", "label"}')
            hist = [(item_index(str(h["item_id"]), h.get("title"), line_no),
                     max(_label(h.get("label", 1), path, line_no), 0)) for h in hist]
        elif u < prep.n_users:
            if not by_user:
                order = np.lexsort((np.arange(len(inter)), inter.timestamp, inter.user))
                starts = np.searchsorted(inter.user[order], np.arange(prep.n_users + 1))
                by_user.update({k: order[starts[k]:starts[k + 1]] for k in range(prep.n_users)})
            rows = by_user[u]
            ts = obj.get("timestamp")
            if ts is not None:
                try:
                    rows = rows[inter.timestamp[rows] < int(ts)]
                except (TypeError, ValueError):
                    raise malformed(path, line_no, f"timestamp must be unix seconds, got {ts!r}") from None
            rows = rows[-hist_len:] if hist_len else rows[:0]
            hist = list(zip(inter.item[rows].tolist(), inter.label[rows].astype(int).tolist()))
        else:
            hist = []
        out_u.append(u)
        out_i.append(i)
        out_y.append(y)
        out_h.append(hist)
        if max_rows and len(out_u) >= max_rows:
            break
    if not out_u:
        raise DataError(f"--input {path}: no rows")
    return Rows(np.array(out_u, np.int64), np.array(out_i, np.int64), np.array(out_y, np.int64), out_h,
                np.full(len(out_u), -1, np.int64), list(new_users), [new_items[k] for k in new_items],
                source=str(path))


OFFICIAL_SEED, OFFICIAL_FRAC = 2025, 0.25  # the official evaluation population: split.sample(frac, random_state)


def official_sample(prep, data_dir, split: str = "test"):
    """Data rows of the official evaluation sample of `split`: the official code scores
    `split.sample(frac=0.25, random_state=2025)`, i.e. RandomState(2025).choice(n, round(n / 4)) over the
    split's n rows in order (sorted data rows).

    `<data_dir>/<split>_official_sample.txt`, when there (the paper's ML-1M split), holds those positions
    among the split's rows of `<data_dir>/interactions.csv` in file order; they are matched to the run's
    rows by (user, item, time). Otherwise the rule is applied to the run's rows of the split in their order."""
    import csv

    d = Path(data_dir) if data_dir else None
    if d is None or not (d / f"{split}_official_sample.txt").is_file() or not (d / "interactions.csv").is_file():
        rows = np.flatnonzero(prep.inter.split == SPLITS.index(split))
        pick = np.random.RandomState(OFFICIAL_SEED).choice(len(rows), round(OFFICIAL_FRAC * len(rows)), replace=False)
        return np.sort(rows[pick])
    positions = np.loadtxt(d / f"{split}_official_sample.txt", dtype=np.int64, ndmin=1)
    keys = []
    with open(d / "interactions.csv", newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            if rec["split"] == split:
                keys.append((rec["user_id"], rec["item_id"], int(rec["timestamp"])))
    inter = prep.inter
    users, items = [str(u) for u in prep.users], [it["raw_id"] for it in prep.items]
    ours = {(users[u], items[i], int(t)): r for r, (u, i, t) in
            enumerate(zip(inter.user.tolist(), inter.item.tolist(), inter.timestamp.tolist()))
            if inter.split[r] == SPLITS.index(split)}
    try:
        return np.array(sorted(ours[keys[p]] for p in positions), dtype=np.int64)
    except (KeyError, IndexError):
        raise DataError(f"{d}/{split}_official_sample.txt does not match the run's {split} rows (was the run "
                        f"prepared from {d}?)") from None
