"""The raw log every source returns, before filtering, labelling, splitting and re-indexing."""

from dataclasses import dataclass

import numpy as np


@dataclass
class RawLog:
    """One row per interaction, in source order (that order breaks timestamp ties later).

    user, item : [n] str   raw ids as in the source
    value      : [n] float64  the rating/stars the label is derived from (the label itself for `csv`)
    timestamp  : [n] int64  unix seconds, UTC
    split      : [n] int8 or None   a split given by the source (csv with a `split` column), else None
    items      : raw item id -> {"title": str, "description": str}; description = genres/categories
    """

    user: np.ndarray
    item: np.ndarray
    value: np.ndarray
    timestamp: np.ndarray
    split: np.ndarray | None
    items: dict

    def __len__(self) -> int:
        return len(self.user)

    def select(self, idx) -> "RawLog":
        split = None if self.split is None else self.split[idx]
        return RawLog(self.user[idx], self.item[idx], self.value[idx], self.timestamp[idx], split, self.items)


def factorize(values) -> tuple:
    """[n] ids (any hashable) -> (unique ids in first-seen order, [n] int64 codes).

    A dict pass: 10x faster than np.unique on 2M fixed-width unicode strings (no string sort).
    """
    values = values.tolist()
    uniq = list(dict.fromkeys(values))  # C-level, keeps first-seen order
    index = {v: i for i, v in enumerate(uniq)}
    return uniq, np.fromiter(map(index.__getitem__, values), dtype=np.int64, count=len(values))


def sorted_ids(values) -> tuple:
    """[n] raw ids -> (unique ids as str, sorted; [n] int64 index into them). Integer ids sort numerically."""
    uniq, codes = factorize(values)
    keys = [str(u) for u in uniq]
    try:
        numeric = [int(k) for k in keys]
        if all(str(v) == k for v, k in zip(numeric, keys)):
            order = np.argsort(np.array(numeric, dtype=np.int64), kind="stable")
        else:
            order = np.argsort(np.array(keys), kind="stable")
    except (ValueError, OverflowError):
        order = np.argsort(np.array(keys), kind="stable")
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys))
    return [keys[i] for i in order.tolist()], rank[codes]
