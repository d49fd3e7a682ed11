"""Clustering user embeddings into groups: spherical k-means, raw-L2 k-means or Ward, the silhouette, the automatic N, centroids."""

import numpy as np

from .config import CLUSTER_METHODS, GroupConfig, GroupError, _as_f32
from .stats import _rounded


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(n > 0, n, 1.0), dtype=np.float32)


def cluster(user_emb, n_groups: int, method: str = GroupConfig.cluster, seed: int = 0, niter: int = 50,
            nredo: int = GroupConfig.nredo) -> np.ndarray:
    """Group labels [n] int64 in 0..N-1 for user_emb [n, D].

    spherical: faiss k-means on L2-normalised embeddings with unit-norm centroids (cosine, the gate's
               similarity), best of `nredo` seeded restarts; on GPU when the faiss build has one.
    kmeans:    the same on the raw embeddings (L2 distance): large-norm users can form their own group.
    ward:      the official code's grouping: standard-scale each dimension, then scikit-learn's Ward
               agglomerative clustering (deterministic; O(n^2) memory, fine for thousands of users).
    """
    x = _as_f32(user_emb, "user_emb")
    if not 1 <= n_groups <= len(x):
        raise ValueError(f"n_groups must be in 1..{len(x)} (number of users), got {n_groups}")
    if method not in CLUSTER_METHODS:
        raise ValueError(f"method must be one of {CLUSTER_METHODS}, got {method!r}")
    if n_groups == 1:
        return np.zeros(len(x), np.int64)
    if method in ("spherical", "kmeans"):
        import faiss

        spherical = method == "spherical"
        fit = _unit(x) if spherical else x
        gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
        # faiss warns below 39 points per centroid; small user sets are the normal case here
        km = faiss.Kmeans(x.shape[1], n_groups, niter=niter, nredo=nredo, seed=seed, gpu=gpu, verbose=False,
                          spherical=spherical, min_points_per_centroid=1, max_points_per_centroid=1 << 30)
        km.train(fit)
        if spherical:  # nearest centroid by inner product = by cosine
            labels = (fit @ km.centroids.T).argmax(1)
        else:
            _, labels = km.index.search(fit, 1)
            labels = labels[:, 0]
        return _relabel(np.asarray(labels, dtype=np.int64))
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.preprocessing import StandardScaler

    scaled = StandardScaler().fit_transform(x)
    return _relabel(AgglomerativeClustering(n_clusters=n_groups, linkage="ward").fit_predict(scaled).astype(np.int64))


def silhouette(user_emb, labels, seed: int = 0, max_users: int = 10000) -> float:
    """Mean silhouette of the labelled users under cosine distance (the gate's geometry), in [-1, 1];
    on a seeded sample of `max_users` users for large sets (the score is O(n^2)); NaN for one group or for as
    many groups as users (where it is undefined)."""
    from sklearn.metrics import silhouette_score

    x, labels = _as_f32(user_emb, "user_emb"), np.asarray(labels)
    keep = labels >= 0
    if not 2 <= len(np.unique(labels[keep])) < keep.sum():
        return float("nan")
    return float(silhouette_score(_unit(x[keep]), labels[keep], metric="cosine",
                                  sample_size=min(int(keep.sum()), max_users), random_state=seed))


def choose_groups(user_emb, max_groups: int = GroupConfig.max_groups, method: str = GroupConfig.cluster,
                  seed: int = 0, min_share: float = GroupConfig.min_share, nredo: int = GroupConfig.nredo):
    """(N, labels, {N: silhouette}): N in 2..max_groups with the best silhouette among the clusterings
    whose every group holds at least min_share of the users (as the official code's k-means search over
    2..10, with the size rule); ValueError when no N qualifies."""
    x = _as_f32(user_emb, "user_emb")
    tried, best = {}, None
    for n in range(2, min(max_groups, len(x) - 1) + 1):  # the silhouette needs fewer groups than users
        labels = cluster(x, n, method, seed=seed, nredo=nredo)
        tried[n] = silhouette(x, labels, seed)
        sizes = np.bincount(labels, minlength=n)
        if sizes.min() >= min_share * len(x) and (best is None or tried[n] > best[2]):
            best = (n, labels, tried[n])
    if best is None:
        raise GroupError(f"no number of groups in 2..{max_groups} gives every group {min_share:.0%} of the "
                         f"{len(x)} users (silhouette by N: {_rounded(tried)})")
    return best[0], best[1], tried


def small_groups(sizes, min_share: float) -> list:
    """Indices of groups holding fewer than min_share of all clustered users."""
    sizes = np.asarray(sizes)
    return np.flatnonzero(sizes < min_share * sizes.sum()).tolist()


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Number groups by first appearance so equal partitions get equal labels whatever the backend."""
    _, first = np.unique(labels, return_index=True)
    order = labels[np.sort(first)]
    mapping = np.empty(labels.max() + 1, np.int64)
    mapping[order] = np.arange(len(order))
    return mapping[labels]


def centroids(user_emb, labels, n_groups: int, directions: bool = False) -> np.ndarray:
    """Mean embedding per group: [N, D], of the raw embeddings, or with `directions` of the unit-normalised
    ones, renormalised (spherical k-means' centroids: each group's mean direction). Rows with label -1 are
    ignored; an empty group is an error."""
    x = _as_f32(user_emb, "user_emb")
    if directions:
        return _unit(centroids(_unit(x), labels, n_groups))
    labels = np.asarray(labels)
    sizes = np.bincount(labels[labels >= 0], minlength=n_groups)
    if len(sizes) > n_groups or np.any(sizes == 0):
        raise ValueError(f"every group 0..{n_groups - 1} needs a member, sizes {sizes.tolist()}")
    sums = np.zeros((n_groups, x.shape[1]), np.float64)
    np.add.at(sums, labels[labels >= 0], x[labels >= 0])
    return (sums / sizes[:, None]).astype(np.float32)
