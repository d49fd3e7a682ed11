"""`csv` source: a directory with `interactions.csv` and `items.csv` (users' own data, the paper's split).

interactions.csv   user_id,item_id,label,timestamp[,split]   label 0/1, timestamp unix seconds,
                   split train|valid|test (or 0|1|2); when present the given split is kept
items.csv          item_id,title[,description]

Either file may be gzip (by content, with or without a .gz name) and must be UTF-8 (a BOM is fine).
Ids must be non-empty; no field may hold a line break (see `_read.read_csv`).
"""

from pathlib import Path

import numpy as np

from ..errors import DataError, malformed, missing_file
from ..raw import RawLog
from ._columns import parse_int
from ._read import read_csv

_SPLIT_NAMES = {"train": 0, "valid": 1, "test": 2, "0": 0, "1": 1, "2": 2}


def _find(data_dir: Path, name: str) -> Path:
    for cand in (data_dir / name, data_dir / (name + ".gz")):
        if cand.exists():
            return cand
    raise missing_file(f"csv source: {name}", [data_dir / name, data_dir / (name + ".gz")],
                       hint="Pass --data-dir pointing to a directory with interactions.csv and items.csv.")


def load(data_dir=None, **_) -> RawLog:
    if data_dir is None:
        raise DataError("csv source needs --data-dir (a directory with interactions.csv and items.csv)")
    data_dir = Path(data_dir)
    inter_path, items_path = _find(data_dir, "interactions.csv"), _find(data_dir, "items.csv")

    items = {}
    for line, row in read_csv(items_path, ("item_id", "title"), ("description",)):
        if not row["item_id"]:
            raise malformed(items_path, line, "item_id is empty; every row needs one")
        if row["item_id"] in items:
            raise malformed(items_path, line, f"item_id {row['item_id']!r} repeats")
        items[row["item_id"]] = {"title": row["title"], "description": row.get("description", "")}

    users, item_ids, labels, stamps, splits = [], [], [], [], []
    has_split = None
    for line, row in read_csv(inter_path, ("user_id", "item_id", "label", "timestamp"), ("split",)):
        if has_split is None:
            has_split = "split" in row
        if not (row["user_id"] and row["item_id"]):
            col = "item_id" if row["user_id"] else "user_id"
            raise malformed(inter_path, line, f"{col} is empty; every row needs one")
        label = parse_int(inter_path, line, "label", row["label"])
        if label not in (0, 1):
            raise malformed(inter_path, line, f"label = {row['label']!r}, expected 0 or 1")
        if row["item_id"] not in items:
            raise malformed(inter_path, line, f"item_id {row['item_id']!r} is not in {items_path}")
        if has_split:
            if row["split"] not in _SPLIT_NAMES:
                raise malformed(inter_path, line, f"split = {row['split']!r}, expected train/valid/test")
            splits.append(_SPLIT_NAMES[row["split"]])
        users.append(row["user_id"])
        item_ids.append(row["item_id"])
        labels.append(label)
        stamps.append(parse_int(inter_path, line, "timestamp (unix seconds)", row["timestamp"]))
    if not users:
        raise DataError(f"{inter_path}: no interactions")
    return RawLog(
        user=np.array(users),
        item=np.array(item_ids),
        value=np.array(labels, dtype=np.float64),
        timestamp=np.array(stamps, dtype=np.int64),
        split=np.array(splits, dtype=np.int8) if has_split else None,
        items=items,
    )
