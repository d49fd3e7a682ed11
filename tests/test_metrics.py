"""thinkrec.metrics against hand-computed cases, scikit-learn, and a loop-over-users implementation."""

import math
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from thinkrec.metrics import auc, bootstrap, evaluate, per_user_auc


def _loop_reference(users, scores, labels, k):
    """The official definitions written the obvious way, one user at a time."""
    ndcgs, aps, uaucs = [], [], []
    for u in np.unique(users):
        m = users == u
        s, y = scores[m], labels[m]
        if len(s) < 2:
            continue
        if 0 < y.sum() < len(y):
            uaucs.append(roc_auc_score(y, s))
        order = np.argsort(-s, kind="stable")
        ranked = y[order][:k]
        dcg = sum(r / math.log2(i + 2) for i, r in enumerate(ranked))
        ideal = np.sort(y)[::-1][:k]
        idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
        ndcgs.append(dcg / idcg if idcg > 0 else 0.0)
        hits, ap = 0, 0.0
        for i, r in enumerate(ranked):
            if r:
                hits += 1
                ap += hits / (i + 1)
        aps.append(ap / y.sum() if y.sum() > 0 else 0.0)
    return np.mean(uaucs), np.mean(ndcgs), np.mean(aps)


def test_hand_computed():
    # user 0: scores .9 .8 .7 .1, labels 0 1 1 0 -> ranked labels 0 1 1 0
    # user 1: one row -> dropped from per-user metrics; user 2: all negative -> NDCG 0, AP 0, no UAUC
    users = np.array([0, 0, 0, 0, 1, 2, 2])
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.5, 0.3, 0.2])
    labels = np.array([0, 1, 1, 0, 1, 0, 0])
    r = evaluate(users, scores, labels, k=5)
    dcg = 1 / math.log2(3) + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3)
    assert r["ndcg@5"] == pytest.approx((dcg / idcg + 0.0) / 2)
    # AP user 0 = (1/2 + 2/3) / 2 positives
    assert r["map@5"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 0.0) / 2)
    # user 0 AUC: pairs (pos, neg): .8>.1, .7>.1 win; .8<.9, .7<.9 lose -> 0.5
    assert r["uauc"] == pytest.approx(0.5)
    assert r["n_users"] == 2 and r["n_uauc_users"] == 1
    assert r["hr@5"] == pytest.approx(0.5)
    assert r["auc"] == pytest.approx(roc_auc_score(labels, scores))


def test_map_divides_by_all_positives():
    # 7 positives, k=5, all top 5 positive: AP = 5/7, not 1 (min(k, P) would give 1)
    users = np.zeros(8, dtype=np.int64)
    scores = np.arange(8, 0, -1).astype(float)
    labels = np.array([1, 1, 1, 1, 1, 1, 1, 0])
    assert evaluate(users, scores, labels)["map@5"] == pytest.approx(5 / 7)


def test_ties_average_rank_like_sklearn():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=101).astype(float)  # heavy ties, odd length
    labels = rng.integers(0, 2, size=101)
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    users = rng.integers(0, 7, size=101)
    ids, per = per_user_auc(users, scores, labels)
    for u, a in zip(ids, per):
        m = users == u
        if 0 < labels[m].sum() < m.sum():
            assert a == pytest.approx(roc_auc_score(labels[m], scores[m]), abs=1e-12)
        else:
            assert np.isnan(a)


@pytest.mark.parametrize("n,n_users,k", [(37, 5, 5), (1000, 53, 5), (997, 131, 3), (500, 20, 10)])
def test_against_loop_reference(n, n_users, k):
    rng = np.random.default_rng(n)
    users = rng.integers(0, n_users, size=n) * 7 + 3  # non-contiguous ids
    scores = np.round(rng.normal(size=n), 1)  # some ties
    labels = (rng.random(n) < 0.4).astype(np.int8)
    r = evaluate(users, scores, labels, k=k)
    uauc, ndcg, ap = _loop_reference(users, scores, labels, k)
    assert r["uauc"] == pytest.approx(uauc, abs=1e-12)
    assert r[f"ndcg@{k}"] == pytest.approx(ndcg, abs=1e-12)
    assert r[f"map@{k}"] == pytest.approx(ap, abs=1e-12)
    assert r["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_single_label_and_errors():
    r = evaluate([0, 0, 1], [0.1, 0.2, 0.3], [1, 1, 1])
    assert np.isnan(r["auc"]) and np.isnan(r["uauc"])
    assert r["map@5"] == pytest.approx(1.0) and r["ndcg@5"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="NaN"):
        evaluate([0, 0], [0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="equal length"):
        evaluate([0, 0], [0.1], [0, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        evaluate([0, 0], [0.1, 0.2], [0, 2])


def test_million_rows_fast():
    rng = np.random.default_rng(1)
    n = 1_000_000
    users = rng.integers(0, 50_000, size=n)
    scores = rng.normal(size=n).astype(np.float32)
    labels = rng.random(n) < 0.5
    # CPU time of this process, not wall time: the bound is about our code, not the CI box's load
    t = time.process_time()
    r = evaluate(users, scores, labels.astype(np.int8))
    assert time.process_time() - t < 5.0
    assert abs(r["auc"] - 0.5) < 0.01 and abs(r["uauc"] - 0.5) < 0.02


def test_bootstrap_resamples_users_and_pairs_the_score_sets():
    rng = np.random.default_rng(3)
    users = np.repeat(np.arange(40), 6)
    labels = (rng.random(len(users)) < 0.5).astype(np.int8)
    noise = rng.normal(size=len(users))
    good, weak = labels + 0.5 * noise, labels + 3.0 * noise
    b = bootstrap(users, {"good": good, "weak": weak, "same": good.copy()}, labels, n=300, seed=0)
    assert b["users"] == 40 and b["n"] == 300
    for name, s in (("good", good), ("weak", weak)):
        point = evaluate(users, s, labels)
        lo, hi = b["intervals"][name]["auc"]
        assert lo < point["auc"] < hi and hi - lo < 0.4
        lo, hi = b["intervals"][name]["uauc"]
        assert lo < point["uauc"] < hi
    # paired: the same scores differ by exactly 0 on every resample; a clearly better scorer wins nearly always
    assert b["differences"]["good"]["same"]["auc"] == [0.0, 0.0]
    assert b["differences"]["good"]["weak"]["auc"][0] > 0 and b["differences"]["good"]["weak"]["p_greater"]["auc"] > 0.97
    assert b["differences"]["weak"]["good"]["auc"][1] < 0
    # one user's rows move together: a user-level resample of 2 users gives wider intervals than of 40
    few = bootstrap(users[:12], {"good": good[:12]}, labels[:12], n=300)
    assert np.diff(few["intervals"]["good"]["auc"])[0] > np.diff(b["intervals"]["good"]["auc"])[0]


def test_bootstrap_averages_are_seed_means_on_each_resample():
    rng = np.random.default_rng(4)
    users = np.repeat(np.arange(30), 6)
    labels = (rng.random(len(users)) < 0.5).astype(np.int8)
    seeds = {f"m@{k}": labels + rng.normal(scale=1.0 + k, size=len(users)) for k in range(3)}
    b = bootstrap(users, {**seeds, "twin": seeds["m@0"].copy()}, labels, n=200, seed=1,
                  averages={"m": list(seeds), "m0": ["m@0"]})
    mean_auc = np.mean([evaluate(users, s, labels)["auc"] for s in seeds.values()])
    lo, hi = b["intervals"]["m"]["auc"]
    assert lo < mean_auc < hi
    # an average of one member is that member on every resample: it differs from its twin by exactly 0
    assert b["differences"]["m0"]["twin"]["auc"] == [0.0, 0.0]
    assert set(b["differences"]["m"]) == {*seeds, "twin", "m0"}
