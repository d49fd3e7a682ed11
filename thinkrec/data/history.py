"""Per-row histories: the user's last `max_len` interactions with a strictly earlier timestamp.

    build_histories(user [n], timestamp [n], max_len, ties="strict") -> hist [n, max_len] int64

`hist[r]` holds ROW indices into the same arrays, oldest first, left-padded with -1: `hist[r, -1]` is the
most recent earlier interaction. Rows of any split count (a test row's history includes the user's train
and valid rows), liked and disliked alike. Rows at the same second as `r` are never history (no
leakage from ties); among earlier rows with equal timestamps, source row order breaks the tie.

Vectorised: sort rows by (user, timestamp, row); for sorted position p let g(p) be the first position of
p's (user, timestamp) tie group and u(p) the first position of p's user. The history of p is the sorted
positions [max(u(p), g(p) - max_len), g(p)), so column `max_len - k` is position g(p) - k when
g(p) - k >= u(p). That is `max_len` vector operations over n rows: O(n * max_len) memory traffic.

ties="file" is the official code's rule (CoLLM's released ML-1M histories follow it): rows of the same
second that come earlier in the data's row order count too, i.e. g(p) is replaced by p. Such a row can be
another row of the same split, so a test prompt may show the label of another test row rated in the same
second (21% of the paper's ML-1M rows have a different history under the two rules).
"""

HISTORY_RULES = ("strict", "file")

import numpy as np


def _group_starts(new_group: np.ndarray) -> np.ndarray:
    """[n] bool 'position starts a group' -> [n] int64 position where each position's group starts."""
    starts = np.where(new_group, np.arange(len(new_group)), 0)
    return np.maximum.accumulate(starts)


def build_histories(user: np.ndarray, timestamp: np.ndarray, max_len: int = 10, ties: str = "strict") -> np.ndarray:
    """Return [n, max_len] int64 row indices of each row's history (-1 = padding, oldest first).
    ties: "strict" (rows of the same second are never history) or "file" (earlier rows of the same second
    in row order are, as in the official code)."""
    if ties not in HISTORY_RULES:
        raise ValueError(f"history rule {ties!r} is not one of {HISTORY_RULES}")
    user = np.asarray(user)
    timestamp = np.asarray(timestamp)
    if user.shape != timestamp.shape or user.ndim != 1:
        raise ValueError(f"user {user.shape} and timestamp {timestamp.shape} must be 1-D of equal length")
    if max_len < 1:
        raise ValueError(f"max_len = {max_len} must be >= 1")
    n = len(user)
    hist = np.full((n, max_len), -1, dtype=np.int64)
    if n == 0:
        return hist
    order = _sort_order(user, timestamp)  # [n] sorted position -> row
    su, st = user[order], timestamp[order]
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = su[1:] != su[:-1]
    new_tie = new_user.copy()
    new_tie[1:] |= st[1:] != st[:-1]
    user_start = _group_starts(new_user)
    tie_start = _group_starts(new_tie) if ties == "strict" else np.arange(n)
    out = np.empty((n, max_len), dtype=np.int64)  # indexed by sorted position
    for k in range(1, max_len + 1):
        pos = tie_start - k
        out[:, max_len - k] = np.where(pos >= user_start, order[np.maximum(pos, 0)], -1)
    hist[order] = out
    return hist


def _sort_order(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """Rows sorted by (user, timestamp, row). One stable argsort of a packed int64 key when it fits
    (2.6x faster than a 3-key lexsort on 2M rows: 0.37 s vs 0.95 s), else the lexsort."""
    n = len(user)
    if n and np.issubdtype(user.dtype, np.integer) and np.issubdtype(timestamp.dtype, np.integer):
        u0, t0 = int(user.min()), int(timestamp.min())
        span = int(timestamp.max()) - t0 + 1
        if (int(user.max()) - u0 + 1) * span < 2**62:
            key = (user.astype(np.int64) - u0) * span + (timestamp.astype(np.int64) - t0)
            return np.argsort(key, kind="stable")
    return np.lexsort((np.arange(n), timestamp, user))

