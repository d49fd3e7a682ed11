"""build_histories against a brute-force definition, with many timestamp ties and odd lengths."""

import numpy as np
import pytest

from thinkrec.data.history import build_histories


def brute_force(user, timestamp, max_len, ties="strict"):
    out = np.full((len(user), max_len), -1, dtype=np.int64)
    for r in range(len(user)):
        earlier = [j for j in range(len(user)) if user[j] == user[r] and (
            timestamp[j] < timestamp[r] or (ties == "file" and timestamp[j] == timestamp[r] and j < r))]
        earlier.sort(key=lambda j: (timestamp[j], j))  # oldest first, source order breaks ties
        take = earlier[-max_len:]
        if take:
            out[r, max_len - len(take):] = take
    return out


@pytest.mark.parametrize("n,n_users,n_times,max_len", [(1, 1, 1, 10), (37, 3, 5, 3), (200, 7, 20, 10), (301, 2, 400, 25)])
@pytest.mark.parametrize("ties", ["strict", "file"])
def test_matches_brute_force(n, n_users, n_times, max_len, ties):
    rng = np.random.default_rng(n)
    user = rng.integers(0, n_users, n)
    timestamp = rng.integers(0, n_times, n)  # few distinct times: many ties
    got = build_histories(user, timestamp, max_len, ties)
    want = brute_force(user, timestamp, max_len, ties)
    assert got.shape == (n, max_len) and got.dtype == np.int64
    bad = np.argwhere(got != want)
    assert len(bad) == 0, f"first mismatches at {bad[:5].tolist()}: got {got[bad[0][0]]}, want {want[bad[0][0]]}"


def test_ties_are_not_history_and_order_is_oldest_first():
    # user 0: t=5 (row 0), t=1 (row 1), t=5 (row 2), t=7 (row 4), t=1 (row 5); user 1: row 3
    user = np.array([0, 0, 0, 1, 0, 0])
    ts = np.array([5, 1, 5, 3, 7, 1])
    h = build_histories(user, ts, 3)
    assert h[0].tolist() == [-1, 1, 5]     # rows 1 and 5 (t=1), not row 2 (same second)
    assert h[2].tolist() == [-1, 1, 5]
    assert h[4].tolist() == [5, 0, 2]       # last three before t=7, oldest first
    assert h[1].tolist() == h[5].tolist() == [-1, -1, -1]  # tie at t=1: neither is the other's history
    assert h[3].tolist() == [-1, -1, -1]
    assert (h >= 0).sum(axis=1).tolist() == [2, 0, 2, 0, 3, 0]  # real entries per padded row
    # the official rule: rows of the same second earlier in row order count, later ones do not
    f = build_histories(user, ts, 3, ties="file")
    assert f[0].tolist() == [-1, 1, 5] and f[2].tolist() == [1, 5, 0]  # row 2 sees row 0 (t=5, earlier row)
    assert f[1].tolist() == [-1, -1, -1] and f[5].tolist() == [-1, -1, 1]  # row 5 sees row 1 (t=1), not vice versa
    assert f[4].tolist() == [5, 0, 2]


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="history rule"):
        build_histories(np.zeros(2, int), np.zeros(2, int), 3, ties="official")
    with pytest.raises(ValueError, match="max_len"):
        build_histories(np.zeros(3), np.zeros(3), 0)
    with pytest.raises(ValueError, match="equal length"):
        build_histories(np.zeros(3), np.zeros(4), 5)
    assert build_histories(np.zeros(0, np.int64), np.zeros(0, np.int64), 4).shape == (0, 4)


def test_unpackable_keys_use_the_lexsort_path():
    rng = np.random.default_rng(5)
    user = rng.integers(0, 4, 90) * 2**40  # (user range) * (time span) overflows int64: no packed key
    timestamp = rng.integers(0, 6, 90) * 2**30
    assert np.array_equal(build_histories(user, timestamp, 4), brute_force(user, timestamp, 4))
