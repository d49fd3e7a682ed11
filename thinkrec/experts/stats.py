"""What the groups report: Cohen's d on the embedding and on the like rate, sizes, routing."""

import math

import numpy as np

from .config import _as_f32
from .gate import route_counts


def _rounded(d: dict) -> dict:
    return {k: round(v, 4) for k, v in d.items()}


def cohens_d(values, labels) -> np.ndarray:
    """Pairwise Cohen's d [N, N] of a scalar per user between groups:
    d_ab = (mean_a - mean_b) / s_pooled,  s_pooled^2 = ((n_a-1) s_a^2 + (n_b-1) s_b^2) / (n_a + n_b - 2)."""
    v, labels = np.asarray(values, np.float64), np.asarray(labels)
    groups = np.unique(labels[labels >= 0])
    d = np.zeros((len(groups), len(groups)))
    for a in range(len(groups)):
        for b in range(len(groups)):
            va, vb = v[labels == groups[a]], v[labels == groups[b]]
            dof = len(va) + len(vb) - 2
            var = ((len(va) - 1) * va.var(ddof=1 if len(va) > 1 else 0) + (len(vb) - 1) * vb.var(ddof=1 if len(vb) > 1 else 0)) / max(dof, 1)
            diff = va.mean() - vb.mean()
            # zero spread: equal means -> 0, different means -> +-inf (perfectly separated)
            d[a, b] = diff / math.sqrt(var) if var > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return d


def embedding_cohens_d(user_emb, labels, cents) -> np.ndarray:
    """Cohen's d [N, N] of the users' embeddings projected on the line between each pair of centroids
    (a scalar per user, so the 1-D effect size applies); |d| large = well separated groups."""
    x = _as_f32(user_emb, "user_emb").astype(np.float64)
    labels = np.asarray(labels)
    n = len(cents)
    d = np.zeros((n, n))
    for a in range(n):
        for b in range(a + 1, n):
            axis = cents[a] - cents[b]
            norm = np.linalg.norm(axis)
            if norm == 0:
                continue
            proj = x @ (axis / norm)
            pair = np.where(np.isin(labels, [a, b]), labels, -1)
            d[a, b] = cohens_d(proj, np.where(pair == a, 0, np.where(pair == b, 1, -1)))[0, 1]
            d[b, a] = -d[a, b]
    return d


def report(labels, route, d_embedding, d_like_rate=None) -> dict:
    """Group sizes, routing counts and mean |Cohen's d| over group pairs."""
    labels, route = np.asarray(labels), np.asarray(route)
    n = len(d_embedding)
    pairs = np.triu_indices(n, 1)
    out = {
        "group_sizes": np.bincount(labels[labels >= 0], minlength=n).tolist(),
        "routing": route_counts(route),
        "cohens_d_embedding": float(np.abs(d_embedding[pairs]).mean()) if n > 1 else 0.0,
        "cohens_d_embedding_matrix": np.round(d_embedding, 4).tolist(),
    }
    if d_like_rate is not None:
        out["cohens_d_like_rate"] = float(np.abs(d_like_rate[pairs]).mean()) if n > 1 else 0.0
    return out
