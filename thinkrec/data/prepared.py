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
All written atomically, stats.json last: its presence marks a complete directory. A damaged file is
reported as one ArtifactError line saying to delete RUN/data/.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thinkrec.io import (ArtifactError, atomic_file, load_npz, read_json, read_jsonl, require_keys, write_json,
                         write_jsonl)

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
    arrays = {k: np.ascontiguousarray(getattr(prep.inter, k), dtype=t) for k, t in _COLUMNS.items()}
    with atomic_file(data_dir / "interactions.npz") as f:
        np.savez(f, **arrays)
    write_json(data_dir / "users.json", [str(u) for u in prep.users], indent=None)
    write_jsonl(data_dir / "items.jsonl", prep.items)
    # stats last: its presence marks a complete prepared directory
    write_json(data_dir / "stats.json", prep.stats, indent=2)


def load_prepared(run_dir) -> Prepared:
    data_dir = Path(run_dir) / "data"
    if not (data_dir / "stats.json").exists():
        raise FileNotFoundError(
            f"{data_dir}: no prepared data (stats.json missing); run `python -m thinkrec.data prepare --run-dir {run_dir}`"
        )
    redo = f"delete {data_dir}/ to prepare the data again"
    path = data_dir / "interactions.npz"
    arrays = load_npz(path, redo)
    require_keys(path, arrays, _COLUMNS, redo)
    inter = Interactions(**{k: arrays[k].astype(t, copy=False) for k, t in _COLUMNS.items()})
    users = read_json(data_dir / "users.json", redo)
    items = read_jsonl(data_dir / "items.jsonl", redo)
    stats = read_json(data_dir / "stats.json", redo)
    _check_contract(data_dir, inter, users, items, stats, redo)
    return Prepared(inter, users, items, stats)


def _check_contract(data_dir, inter, users, items, stats, redo) -> None:
    """ArtifactError naming the file(s) when well-formed files break the contract above (a flipped key, a cut
    column), so no later stage fails on them with a KeyError or IndexError."""
    cols = {k: getattr(inter, k) for k in _COLUMNS}
    n = len(inter.user) if inter.user.ndim == 1 else -1
    if any(c.ndim != 1 or len(c) != n for c in cols.values()):
        files, why = ["interactions.npz"], f"columns of other shapes: { {k: c.shape for k, c in cols.items()} }"
    elif not isinstance(users, list):
        files, why = ["users.json"], "not a list of user ids"
    elif not all(isinstance(it, dict) and it.get("item") == i and "raw_id" in it for i, it in enumerate(items)):
        files, why = ["items.jsonl"], "not one {\"item\": <its line's index>, \"raw_id\", ...} per line"
    elif not isinstance(stats, dict):
        files, why = ["stats.json"], "not a JSON object"
    elif n and not (0 <= inter.user.min() and inter.user.max() < len(users)):
        files, why = ["interactions.npz", "users.json"], f"user indices outside the {len(users)} users"
    elif n and not (0 <= inter.item.min() and inter.item.max() < len(items)):
        files, why = ["interactions.npz", "items.jsonl"], f"item indices outside the {len(items)} items"
    else:
        return
    named = " and ".join(str(Path(data_dir) / f) for f in files)
    raise ArtifactError(f"{named} {'do' if len(files) > 1 else 'does'} not fit the prepared data ({why}); {redo}")
