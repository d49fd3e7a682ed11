"""The gate (cosine to the centroids, softmax, single / mixture / global) and the routing tables of stage 3 and scoring."""

import math

import numpy as np
import torch

from .config import GroupConfig, ROUTE_GLOBAL, ROUTE_MIXTURE, ROUTE_SINGLE, _as_f32


def _cosine(user_emb, cents):
    """cos [n, N] and a mask [n] of rows whose cosine is defined (non-zero user vector)."""
    x, c = _as_f32(user_emb, "user_emb").astype(np.float64), _as_f32(cents, "centroids").astype(np.float64)
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"user_emb dim {x.shape[1]} != centroids dim {c.shape[1]}")
    xn, cn = np.linalg.norm(x, axis=1), np.linalg.norm(c, axis=1)
    ok = xn > 0
    cos = (x @ c.T) / np.maximum(xn, 1e-300)[:, None] / np.where(cn > 0, cn, 1.0)[None, :]
    return cos, ok


def assign(user_emb, cents) -> np.ndarray:
    """Nearest centroid by cosine (the gate's similarity): [n] int64, -1 for zero vectors."""
    cos, ok = _cosine(user_emb, cents)
    return np.where(ok, cos.argmax(1), -1).astype(np.int64)


def gate(user_emb, cents, tau: float = GroupConfig.tau, single_threshold: float | None = None,
         entropy_threshold: float | None = None, known=None):
    """Adapter weights [n, N+1] float32 (column 0 = global) and route [n] int8 (0 global, 1 single,
    2 mixture); see the module docstring. Thresholds default to 0.5 + 0.6/N and 0.95 log N; `known`
    [n] bool marks users seen in training (others go to global)."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    cos, ok = _cosine(user_emb, cents)
    n, n_groups = cos.shape
    single_threshold = 0.5 + 0.6 / n_groups if single_threshold is None else single_threshold
    entropy_threshold = 0.95 * math.log(n_groups) if entropy_threshold is None else entropy_threshold
    z = cos / tau
    w = np.exp(z - z.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    entropy = -(w * np.log(np.maximum(w, 1e-300))).sum(1)
    top = w.argmax(1)
    route = np.full(n, ROUTE_MIXTURE, np.int8)
    route[entropy >= entropy_threshold] = ROUTE_GLOBAL
    route[w.max(1) > single_threshold] = ROUTE_SINGLE
    if n_groups == 1:
        route[:] = ROUTE_SINGLE  # a mixture of one expert is that expert
    route[~ok] = ROUTE_GLOBAL
    if known is not None:
        route[~np.asarray(known, bool)] = ROUTE_GLOBAL
    weights = np.zeros((n, n_groups + 1), np.float32)
    weights[route == ROUTE_GLOBAL, 0] = 1.0
    single = np.flatnonzero(route == ROUTE_SINGLE)
    weights[single, 1 + top[single]] = 1.0
    mix = route == ROUTE_MIXTURE
    weights[mix, 1:] = w[mix]
    return weights, route


def route_counts(route) -> dict:
    """How many users each route takes: {"global", "single", "mixture"}."""
    route = np.asarray(route)
    return {"global": int((route == ROUTE_GLOBAL).sum()), "single": int((route == ROUTE_SINGLE).sum()),
            "mixture": int((route == ROUTE_MIXTURE).sum())}


def train_table(groups: dict, user_emb: np.ndarray) -> np.ndarray:
    """[n_users, N + 1]: each user routed one-hot to adapter 1 + its group (stage 3's training routing)."""
    labels = groups["labels"].copy()
    missing = labels < 0
    if missing.any():
        labels[missing] = np.maximum(assign(user_emb[missing] - groups["center"], groups["centroids"]), 0)
    return one_hot_experts(labels, len(groups["centroids"])).numpy()


def one_hot_experts(groups, n_groups: int) -> torch.Tensor:
    """[B] group ids in 0..N-1 -> [B, N + 1] float32 weights routing each row to adapter 1 + group."""
    groups = torch.as_tensor(np.asarray(groups), dtype=torch.long)
    w = torch.zeros(len(groups), n_groups + 1, dtype=torch.float32)
    w[torch.arange(len(groups)), groups + 1] = 1.0
    return w


def table_router(weights):
    """route(users [B] tensor) -> [B, E] float32: rows of a per-user weight table."""
    table = torch.as_tensor(np.asarray(weights), dtype=torch.float32)

    def route(users: torch.Tensor) -> torch.Tensor:
        return table[users.cpu().long()]

    return route


def routing_counts(weights: np.ndarray, users) -> dict:
    """How many rows (users given per row) go to the global adapter, one expert, or a mixture."""
    w = np.asarray(weights)[np.asarray(users)]
    glob = w[:, 0] == 1.0
    single = ~glob & (w.max(1) == 1.0)
    out = {"global": int(glob.sum()), "mixture": int((~glob & ~single).sum())}
    for e in range(1, w.shape[1]):
        out[f"expert_{e}"] = int((single & (w[:, e] == 1.0)).sum())
    return out
