"""thinkrec.experts: clustering determinism and recovery, centroids, the gate's routes and edge cases."""

import math

import numpy as np
import pytest

from thinkrec.experts import (ROUTE_GLOBAL, ROUTE_MIXTURE, ROUTE_SINGLE, GroupError, assign, centroids,
                              choose_groups, cluster, cohens_d, embedding_cohens_d, gate, report, silhouette,
                              small_groups)


def _blobs(n_per=(40, 23, 31), dim=7, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(n_per), dim)) * 5
    x = np.concatenate([c + rng.normal(size=(n, dim)) for c, n in zip(centers, n_per)]).astype(np.float32)
    truth = np.repeat(np.arange(len(n_per)), n_per)
    return x, truth


def _same_partition(a, b):
    return all(len(np.unique(b[a == g])) == 1 for g in np.unique(a)) and len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("method", ["spherical", "kmeans", "ward"])
def test_cluster_recovers_blobs_and_is_deterministic(method):
    x, truth = _blobs()
    a = cluster(x, 3, method, seed=3)
    b = cluster(x, 3, method, seed=3)
    assert np.array_equal(a, b)
    assert _same_partition(a, truth)
    assert a[0] == 0  # labels numbered by first appearance


def test_cluster_errors_and_one_group():
    x, _ = _blobs()
    assert np.array_equal(cluster(x, 1), np.zeros(len(x)))
    with pytest.raises(ValueError, match="n_groups"):
        cluster(x[:2], 3)
    with pytest.raises(ValueError, match="method"):
        cluster(x, 2, "dbscan")


def test_centroids_are_raw_means():
    x, truth = _blobs()
    labels = truth.copy()
    labels[0] = -1  # ignored row
    c = centroids(x, labels, 3)
    np.testing.assert_allclose(c[0], x[1:40].mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c[2], x[63:].mean(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs a member"):
        centroids(x, truth, 4)


def test_gate_routes():
    cents = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    users = np.array([
        [1.0, 0, 0],        # cos (1, 0, 0): w_0 = 1/(1 + 2 e^-10) ~ 1 > 0.7 -> single expert 0
        [1.0, 1.0, 1.0],    # equal cosines: uniform w, H = log 3 > 0.95 log 3 -> global
        [1.0, 1.0, 0.0],    # w = (~.5, ~.5, ~0): max .5 < .7, H = log 2 < 0.95 log 3 -> mixture
        [0.0, 0.0, 0.0],    # zero vector: cosine undefined -> global
        [0.0, 0.0, 2.0],    # known False below -> global despite a clear expert
    ])
    w, route = gate(users, cents, known=[True, True, True, True, False])
    assert route.tolist() == [ROUTE_SINGLE, ROUTE_GLOBAL, ROUTE_MIXTURE, ROUTE_GLOBAL, ROUTE_GLOBAL]
    assert w.shape == (5, 4) and np.all(np.isfinite(w))
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    assert w[0].tolist() == [0, 1, 0, 0]
    assert w[1].tolist() == [1, 0, 0, 0] and w[3].tolist() == [1, 0, 0, 0] and w[4].tolist() == [1, 0, 0, 0]
    z = np.exp(np.array([math.sqrt(0.5), math.sqrt(0.5), 0.0]) / 0.1)
    np.testing.assert_allclose(w[2], np.r_[0.0, z / z.sum()], rtol=1e-5)
    assert assign(users, cents).tolist()[:1] == [0] and assign(users, cents)[3] == -1


def test_gate_thresholds_are_parameters():
    cents = np.array([[1.0, 0], [0, 1.0]])
    u = np.array([[1.0, 0.8]])  # w_0 = sigmoid((1 - .8)/sqrt(1.64)/0.1) ~ 0.83 > 0.8 -> single
    assert gate(u, cents)[1][0] == ROUTE_SINGLE
    assert gate(u, cents, single_threshold=0.9)[1][0] == ROUTE_MIXTURE
    assert gate(u, cents, single_threshold=0.9, entropy_threshold=0.1)[1][0] == ROUTE_GLOBAL
    assert gate(u, cents, tau=1.0)[1][0] == ROUTE_GLOBAL  # soft weights: near-uniform, high entropy


def test_gate_one_group_is_that_expert():
    rng = np.random.default_rng(0)
    users = rng.normal(size=(9, 5))
    users[4] = 0
    w, route = gate(users, users.mean(0, keepdims=True) + 1)
    assert route[4] == ROUTE_GLOBAL and w[4].tolist() == [1, 0]
    keep = np.arange(9) != 4
    assert np.all(route[keep] == ROUTE_SINGLE) and np.all(w[keep] == [0, 1])


def test_gate_rejects_bad_input():
    with pytest.raises(ValueError, match="dim"):
        gate(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="tau"):
        gate(np.ones((2, 3)), np.ones((2, 3)), tau=0)
    with pytest.raises(ValueError, match="NaN"):
        gate(np.full((2, 3), np.nan), np.ones((2, 3)))


def test_cohens_d():
    values = np.array([1.0, 2, 3, 4, 5, 6, 7])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    # means 2 and 5.5, sample variances 1 and 5/3 -> pooled (2*1 + 3*5/3)/5 = 1.4
    d = cohens_d(values, labels)
    assert d[0, 1] == pytest.approx((2 - 5.5) / math.sqrt(1.4)) and d[1, 0] == pytest.approx(-d[0, 1])
    x, truth = _blobs()
    de = embedding_cohens_d(x, truth, centroids(x, truth, 3))
    assert np.all(np.abs(de[np.triu_indices(3, 1)]) > 3)  # well separated blobs
    rep = report(truth, np.array([0, 1, 2] * 31 + [1]), de)
    assert rep["group_sizes"] == [40, 23, 31] and rep["routing"] == {"global": 31, "single": 32, "mixture": 31}


def test_cli_writes_groups_and_report(tmp_path):
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from thinkrec.data.prepared import Interactions, Prepared, save_prepared
    from thinkrec.experts.__main__ import main

    x, truth = _blobs(n_per=(12, 9), dim=5)
    n = len(x)
    user = np.arange(n - 2)  # the last 2 users have only a test row: unseen in training
    x[-2] = x[:-2].mean(0)  # a cold user as the CF models leave it (the mean trained vector): zero once centred
    inter = Interactions(np.r_[user, n - 2, n - 1], np.zeros(n, np.int64), (np.arange(n) % 3 == 0).astype(np.int8),
                         np.arange(n), np.r_[np.zeros(n - 2), 2, 2].astype(np.int8))
    save_prepared(Prepared(inter, [str(u) for u in range(n)], [{"item": 0, "raw_id": "0"}], {}), tmp_path)
    (tmp_path / "cf").mkdir()
    save_file({"user_emb": torch.from_numpy(x)}, tmp_path / "cf" / "mf.safetensors")
    rep = main(["--run-dir", str(tmp_path), "--groups", "2"])
    out = load_file(tmp_path / "experts" / "groups.safetensors")
    assert out["weights"].shape == (n, 3) and out["centroids"].shape == (2, 5)
    assert out["labels"][-2:].tolist() == [-1, -1]
    # unseen users are gated by their embedding (official): the cold one is global, the other one is routed
    assert out["route"][-2] == 0 and out["route"][-1] != 0
    assert sorted(rep["group_sizes"]) == [7, 12] and sum(rep["routing"].values()) == n
    assert rep["cohens_d_embedding"] > 3 and 0 <= rep["cohens_d_like_rate"] < 3
    assert json.loads((tmp_path / "experts" / "report.json").read_text())["group_sizes"] == rep["group_sizes"]


def _directions(n_per=(60, 50), outliers=(3, 3), dim=16, norm=40.0, seed=0):
    """Users spread around len(n_per) directions with norms ~1, plus a few users of large norm along each
    direction (many interactions): the geometry where raw-L2 k-means splits by norm."""
    rng = np.random.default_rng(seed)
    dirs = np.linalg.qr(rng.normal(size=(dim, len(n_per))))[0].T  # orthonormal directions
    xs, truth = [], []
    for g, (n, k) in enumerate(zip(n_per, outliers)):
        scale = np.concatenate([rng.uniform(0.5, 1.5, n), np.full(k, norm)])
        xs.append(scale[:, None] * (dirs[g] + 0.25 * rng.normal(size=(n + k, dim))))
        truth.append(np.full(n + k, g))
    return np.concatenate(xs).astype(np.float32), np.concatenate(truth)


def test_spherical_groups_follow_directions_not_norms():
    x, truth = _directions()
    assert _same_partition(cluster(x, 2, "spherical", seed=1), truth)  # outliers join their direction
    raw = cluster(x, 2, "kmeans", seed=1)
    assert not _same_partition(raw, truth)  # raw L2 splits off the large-norm users
    assert min(np.bincount(raw)) <= 6
    assert small_groups(np.bincount(raw), 0.05) == [int(np.argmin(np.bincount(raw)))]
    assert small_groups([733, 7], 0.05) == [1] and small_groups([358, 393], 0.05) == []


def test_choose_groups_picks_the_planted_number_and_respects_the_share():
    x, truth = _directions(n_per=(40, 35, 45), outliers=(2, 2, 2))
    n, labels, tried = choose_groups(x, max_groups=6, seed=0)
    assert n == 3 and _same_partition(labels, truth)
    assert set(tried) == {2, 3, 4, 5, 6} and tried[3] == max(tried.values())
    assert silhouette(x, labels) == pytest.approx(tried[3])
    with pytest.raises(GroupError, match="every group 60%"):
        choose_groups(x, max_groups=3, min_share=0.6)


def test_gate_routes_users_near_their_centroid_to_their_group():
    x, truth = _directions(n_per=(40, 35, 45), outliers=(0, 0, 0))
    labels = cluster(x, 3, "spherical", seed=0)
    cents = centroids(x, labels, 3, directions=True)
    np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, rtol=1e-5)
    w, route = gate(x, cents)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    near = (unit * cents[labels]).sum(1) > 0.6  # cos to its own centroid (others ~0 here)
    assert near.sum() > 60
    assert (route[near] == ROUTE_SINGLE).all() and (w[near, 1:].argmax(1) == labels[near]).all()


def test_narrow_cone_users_are_routed_after_centring():
    """Every user within a few degrees of one direction (SASRec's layer-normed states): raw cosines to any
    centroid are all ~1 and the gate sends everyone to the global adapter; around the mean they separate."""
    from tests.data_fixtures import toy_prepared
    from thinkrec.experts import GroupConfig, group_users

    x, truth = _directions(n_per=(30, 30), outliers=(0, 0), dim=8, seed=2)
    rng = np.random.default_rng(0)
    common = rng.normal(size=8)
    cone = (20 * common / np.linalg.norm(common) + 0.3 * x / np.linalg.norm(x, axis=1, keepdims=True))
    cone = cone.astype(np.float32)
    prep = toy_prepared([(u, 0, u % 2, 10 * u, 0) for u in range(60)] + [(u, 1, 1, 10 * u + 5, 2) for u in range(60)])
    cents_raw = centroids(cone, truth, 2, directions=True)
    assert (gate(cone, cents_raw)[1] == ROUTE_GLOBAL).all()  # the failure without centring
    tensors, rep = group_users(cone, prep, GroupConfig(groups=2))
    labels = tensors["labels"].numpy()
    assert _same_partition(labels, truth) and rep["small_groups"] == []
    assert rep["routing_by_split"]["test"]["single"] >= 55
    np.testing.assert_allclose(tensors["center"].numpy(), cone.mean(0), rtol=1e-5)
    _, off = group_users(cone, prep, GroupConfig(groups=2, center=False))
    assert off["routing_by_split"]["test"]["global"] == 60


def test_gate_thresholds_at_their_boundaries():
    """H(w) >= threshold -> global (the official >=); max(w) > threshold -> single (strict), else mixture."""
    import math

    cents = np.array([[1.0, 0.0], [0.0, 1.0]])
    u = np.array([[1.0, 0.4]])
    from thinkrec.experts import GroupConfig
    from thinkrec.experts.gate import _cosine

    z = _cosine(u, cents)[0][0] / GroupConfig.tau  # the gate's own softmax, in the same arithmetic
    p = np.exp(z - z.max())
    p /= p.sum()
    h = float(-(p * np.log(np.maximum(p, 1e-300))).sum())
    assert gate(u, cents, single_threshold=1.0, entropy_threshold=h)[1][0] == ROUTE_GLOBAL  # equal: global
    assert gate(u, cents, single_threshold=1.0, entropy_threshold=h + 1e-6)[1][0] == ROUTE_MIXTURE
    top = float(p.max())
    assert gate(u, cents, single_threshold=top, entropy_threshold=10.0)[1][0] == ROUTE_MIXTURE  # equal: not single
    assert gate(u, cents, single_threshold=top - 1e-6, entropy_threshold=10.0)[1][0] == ROUTE_SINGLE
    uniform = gate(np.array([[1.0, 1.0]]), cents)  # w = (1/2, 1/2): H = log 2 >= 0.95 log 2
    assert uniform[1][0] == ROUTE_GLOBAL and math.isclose(0.95 * math.log(2), 0.6585, rel_tol=1e-3)
