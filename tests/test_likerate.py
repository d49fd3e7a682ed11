"""The like-rate floor (thinkrec/cf/likerate.py): the formula by hand, unseen ids at the global rate, and the
prior picked on valid AUC."""

from types import SimpleNamespace

import numpy as np
import pytest

from thinkrec.cf.likerate import PRIOR_GRID, fit, fit_rates


def _logit(p):
    return np.log(p / (1 - p))


def test_scores_are_the_smoothed_rates_added_in_logit_space():
    # user 0 likes 3 of 4 rows, user 1 likes 0 of 2; item 0: 2 of 3, item 1: 1 of 3; global 3 of 6
    user, item, label = [0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0]
    lr = fit_rates(user, item, label, n_users=3, n_items=3, prior=2.0)
    r = 0.5
    ru, ri = (3 + 2 * r) / (4 + 2), (1 + 2 * r) / (3 + 2)
    assert lr.score([0], [1])[0] == pytest.approx(_logit(ru) + _logit(ri) - _logit(r))
    # user 2 and item 2 have no train rows, ids 7 / 9 are past the tables: all at the global rate
    assert lr.score([2, 7], [2, 9]) == pytest.approx([_logit(r), _logit(r)])
    assert lr.score([0], [0])[0] > lr.score([1], [0])[0]  # the liking user ranks above the disliking one


def test_prior_is_picked_on_valid_auc():
    """Valid labels follow the train rates of users with many rows and not those of users with one row: a
    strong prior (shrinking the one-row users to the mean) wins over a weak one."""
    rng = np.random.default_rng(0)
    n_users, n_items = 60, 5
    rows = []
    for u in range(n_users):
        many = u < 30
        p = 0.85 if u % 2 else 0.15
        n = 40 if many else 1
        for _ in range(n):
            rows.append((u, int(rng.integers(n_items)), int(rng.random() < (p if many else 0.5)), 0))
        for _ in range(6):  # valid: the many-row users keep their rate, the one-row users are coin flips
            rows.append((u, int(rng.integers(n_items)), int(rng.random() < (p if many else 0.5)), 1))
    u, i, y, s = map(np.array, zip(*rows))

    def split(k):
        m = s == k
        return SimpleNamespace(user=u[m], item=i[m], label=y[m])

    prep = SimpleNamespace(n_users=n_users, n_items=n_items,
                           inter=SimpleNamespace(of_split=lambda name: split({"train": 0, "valid": 1}[name])))
    picked = fit(prep)
    assert picked.prior in PRIOR_GRID and picked.prior > PRIOR_GRID[0]
    assert fit(prep, grid=(picked.prior,)).score(u, i) == pytest.approx(picked.score(u, i))
