"""Labels and time splits of each dataset, as the paper and its official code define them.

Every rule maps a `RawLog` to `(keep, label, split)`: `keep` [n] bool selects rows, `label` [n] int8 and
`split` [n] int8 (0 train, 1 valid, 2 test) are defined on all rows (meaningless where `keep` is False).

    ml1m         label = rating >= 4; UTC months 2001-06..2002-03 train, 2002-04..2002-08 valid,
                 2002-09..2003-01 test, everything else dropped
    amazon-book  year 2017, users and items with > 20 ratings, label = rating == 5,
                 Jan..Oct train, Nov..Dec sorted by time and halved (first half valid)
    yelp         years 2010..2022, same filter, label = stars >= 4, 2010..2019 train, rest halved
    ml100k       label = rating >= 4, global time order 80 / 10 / 10
    csv          label as given; split as given, else global time order 80 / 10 / 10
"""

import numpy as np

from .raw import RawLog, factorize


def utc_months(timestamp: np.ndarray) -> np.ndarray:
    """[n] int64 unix seconds -> [n] int64 months since 1970-01 (UTC): 2001-06 is 31*12 + 5."""
    return timestamp.astype("datetime64[s]").astype("datetime64[M]").astype(np.int64)


def month_index(year: int, month: int) -> int:
    return (year - 1970) * 12 + (month - 1)


def time_order(timestamp: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The given row indices sorted by timestamp; ties keep source order (a stable sort)."""
    return rows[np.argsort(timestamp[rows], kind="stable")]


def halve_by_time(timestamp, rows, split, first: int, second: int) -> None:
    """Sort `rows` by time and write `first` into the earlier half, `second` into the later (in place).

    With an odd count the later half gets the extra row (n // 2 rows go to `first`).
    """
    ordered = time_order(timestamp, rows)
    half = len(ordered) // 2
    split[ordered[:half]] = first
    split[ordered[half:]] = second


def fraction_split(timestamp, rows, split, fractions=(0.8, 0.1)) -> None:
    """Global time order: the first floor(0.8 n) rows train, the next floor(0.1 n) valid, the rest test."""
    ordered = time_order(timestamp, rows)
    n_train = int(len(ordered) * fractions[0])
    n_valid = int(len(ordered) * fractions[1])
    split[ordered[:n_train]] = 0
    split[ordered[n_train:n_train + n_valid]] = 1
    split[ordered[n_train + n_valid:]] = 2


def min_count_filter(log: RawLog, keep: np.ndarray, min_count: int) -> np.ndarray:
    """Keep rows whose user AND item each have > `min_count` rows among the kept ones (one pass).

    One pass, like the official preprocessing: a user can fall to <= min_count after items are removed.
    """
    rows = np.flatnonzero(keep)
    out = np.zeros_like(keep)
    ok = np.ones(len(rows), dtype=bool)
    for ids in (log.user[rows], log.item[rows]):
        _, codes = factorize(ids)
        ok &= np.bincount(codes)[codes] > min_count
    out[rows[ok]] = True
    return out


def ml1m(log: RawLog):
    months = utc_months(log.timestamp)
    split = np.full(len(log), -1, dtype=np.int8)
    for s, (lo, hi) in enumerate([((2001, 6), (2002, 3)), ((2002, 4), (2002, 8)), ((2002, 9), (2003, 1))]):
        split[(months >= month_index(*lo)) & (months <= month_index(*hi))] = s
    return split >= 0, (log.value >= 4).astype(np.int8), split


def _year_filtered_halves(log: RawLog, years, train_until_month: int, min_count: int):
    months = utc_months(log.timestamp)
    keep = (months >= month_index(years[0], 1)) & (months <= month_index(years[1], 12))
    keep = min_count_filter(log, keep, min_count)
    split = np.zeros(len(log), dtype=np.int8)
    later = np.flatnonzero(keep & (months > train_until_month))
    halve_by_time(log.timestamp, later, split, 1, 2)
    return keep, split


def amazon_book(log: RawLog, min_count: int = 20):
    keep, split = _year_filtered_halves(log, (2017, 2017), month_index(2017, 10), min_count)
    return keep, (log.value == 5).astype(np.int8), split


def yelp(log: RawLog, min_count: int = 20):
    keep, split = _year_filtered_halves(log, (2010, 2022), month_index(2019, 12), min_count)
    return keep, (log.value >= 4).astype(np.int8), split


def ml100k(log: RawLog):
    split = np.zeros(len(log), dtype=np.int8)
    fraction_split(log.timestamp, np.arange(len(log)), split)
    return np.ones(len(log), dtype=bool), (log.value >= 4).astype(np.int8), split


def csv(log: RawLog):
    if log.split is not None:
        split = log.split.astype(np.int8)
    else:
        split = np.zeros(len(log), dtype=np.int8)
        fraction_split(log.timestamp, np.arange(len(log)), split)
    return np.ones(len(log), dtype=bool), log.value.astype(np.int8), split


RULES = {"ml1m": ml1m, "amazon-book": amazon_book, "yelp": yelp, "ml100k": ml100k, "csv": csv}
