"""`prepare`: source -> labels and time splits -> contiguous indices -> RUN/data (see prepared.py).

Rows are sorted by (split, user, timestamp, source order); users and items are indexed in the order of
their raw ids (numeric order when every id is an integer), counting only those left after filtering.
"""

import sys

import numpy as np

from . import sources, splits
from .errors import DataError
from .prompts import NOUNS
from .raw import sorted_ids
from .prepared import SPLITS, Interactions, Prepared, save_prepared


def compute_stats(inter: Interactions, n_users: int, n_items: int, dataset: str) -> dict:
    """Rows, users and positive rate per split; sigma/mu of interactions per user over all rows."""
    per_user = np.bincount(inter.user, minlength=n_users).astype(np.float64)
    stats = {"dataset": dataset, "users": n_users, "items": n_items, "rows": int(len(inter))}
    for s, name in enumerate(SPLITS):
        m = inter.split == s
        stats[name] = {
            "rows": int(m.sum()),
            "users": int(len(np.unique(inter.user[m]))),
            "items": int(len(np.unique(inter.item[m]))),
            "positive_rate": round(float(inter.label[m].mean()), 4) if m.any() else 0.0,
        }
    mu, sigma = float(per_user.mean()), float(per_user.std())
    stats["inter_per_user_mu"] = round(mu, 3)
    stats["inter_per_user_sigma"] = round(sigma, 3)
    stats["sigma_over_mu"] = round(sigma / mu, 4)
    return stats


def format_stats(stats: dict) -> str:
    """A table like the paper's Table 1 plus per-split rows (markdown)."""
    head = "| dataset | train | valid | test | users | items | sigma/mu |\n|---|---|---|---|---|---|---|"
    row = (f"| {stats['dataset']} | {stats['train']['rows']:,} | {stats['valid']['rows']:,} | "
           f"{stats['test']['rows']:,} | {stats['users']:,} | {stats['items']:,} | {stats['sigma_over_mu']:.4f} |")
    splits_tab = "\n| split | rows | users | items | positive rate |\n|---|---|---|---|---|\n" + "\n".join(
        f"| {s} | {stats[s]['rows']:,} | {stats[s]['users']:,} | {stats[s]['items']:,} | "
        f"{stats[s]['positive_rate']:.3f} |"
        for s in SPLITS)
    return head + "\n" + row + "\n" + splits_tab


def build_prepared(log, dataset: str) -> Prepared:
    """Apply the dataset's label/split rule to a RawLog and re-index; nothing is written."""
    keep, label, split = splits.RULES[dataset](log)
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        raise DataError(f"{dataset}: no interactions left after the time/count filters")
    log, label, split = log.select(rows), label[rows], split[rows]
    users, user_idx = sorted_ids(log.user)
    item_raw, item_idx = sorted_ids(log.item)
    order = np.lexsort((np.arange(len(rows)), log.timestamp, user_idx, split))
    inter = Interactions(user=user_idx[order], item=item_idx[order], label=label[order].astype(np.int8),
                         timestamp=log.timestamp[order], split=split[order].astype(np.int8))
    items = []
    for i, raw_id in enumerate(item_raw):
        meta = log.items.get(raw_id, {})
        entry = {"item": i, "raw_id": raw_id, "title": meta.get("title", raw_id),
                 "description": meta.get("description", "")}
        if meta.get("text"):  # longer metadata (Amazon descriptions) for the keyword-extraction step
            entry["text"] = meta["text"]
        items.append(entry)
    return Prepared(inter, users, items, compute_stats(inter, len(users), len(items), dataset))


def prepare(dataset: str, data_dir=None, out=None, quiet: bool = False, noun: str | None = None,
            **opts) -> Prepared:
    """Load `dataset`, label and split it, write `out/data` (when `out` is given), print the stats table.

    `noun` (movie / book / business; default by dataset, "item" for csv) is stored in stats.json for the
    prompts. Nothing is written unless loading and splitting succeeded.
    """
    log = sources.load(dataset, data_dir=data_dir, **opts)
    prep = build_prepared(log, dataset)
    prep.stats["noun"] = noun or NOUNS[dataset]
    if out is not None:
        save_prepared(prep, out)
    if not quiet:
        print(format_stats(prep.stats), file=sys.stdout)
    return prep
