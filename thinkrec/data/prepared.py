"""The prepared-data contract: what `prepare` writes into a run directory and every later stage reads.

RUN/data/interactions.npz   numpy arrays (saved without pickle), one row per interaction, sorted by
                            (split, user, timestamp, original order):
    user       int64  0-based contiguous user index
    item       int64  0-based contiguous item index
    label      int8   1 = liked, 0 = not
    timestamp  int64  unix seconds (UTC)
    split      int8   0 = train, 1 = valid, 2 = test
RUN/data/users.json         raw user ids, position = user index
RUN/data/items.jsonl        one JSON object per item index: {"item", "raw_id", "title", "description"}
RUN/data/stats.json         rows per split, users, items, sigma/mu of interactions per user
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thinkrec.io import atomic_write_text

SPLITS = ("train", "valid", "test")
_COLUMNS = {"user": np.int64, "item": np.int64, "label": np.int8, "timestamp": np.int64, "split": np.int8}


@dataclass
class Interactions:
    user: np.ndarray
    item: np.ndarray
    label: np.ndarray
    timestamp: np.ndarray
    split: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    def select(self, mask_or_index) -> "Interactions":
        return Interactions(**{k: getattr(self, k)[mask_or_index] for k in _COLUMNS})

    def of_split(self, name: str) -> "Interactions":
        return self.select(self.split == SPLITS.index(name))


@dataclass
class Prepared:
    inter: Interactions
    users: list  # raw user ids
    items: list  # dicts {"item", "raw_id", "title", "description"}
    stats: dict

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)


def save_prepared(prep: Prepared, run_dir) -> None:
    data_dir = Path(run_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(getattr(prep.inter, k), dtype=t) for k, t in _COLUMNS.items()}
    tmp = data_dir / ".interactions.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, data_dir / "interactions.npz")
    atomic_write_text(data_dir / "users.json", json.dumps([str(u) for u in prep.users]))
    atomic_write_text(data_dir / "items.jsonl", "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in prep.items))
    # stats last: its presence marks a complete prepared directory
    atomic_write_text(data_dir / "stats.json", json.dumps(prep.stats, indent=2))


def load_prepared(run_dir) -> Prepared:
    data_dir = Path(run_dir) / "data"
    if not (data_dir / "stats.json").exists():
        raise FileNotFoundError(
            f"{data_dir}: no prepared data (stats.json missing); run `python -m thinkrec.data prepare --out {run_dir}`"
        )
    with np.load(data_dir / "interactions.npz", allow_pickle=False) as z:
        inter = Interactions(**{k: z[k].astype(t, copy=False) for k, t in _COLUMNS.items()})
    users = json.loads((data_dir / "users.json").read_text())
    with open(data_dir / "items.jsonl", encoding="utf-8") as f:
        items = [json.loads(line) for line in f]
    stats = json.loads((data_dir / "stats.json").read_text())
    return Prepared(inter, users, items, stats)
