"""User groups for the LoRA experts: clustering of CF user embeddings, centroids, the gate, routing tables.

    python -m thinkrec.experts --run-dir RUN --cf-model mf --groups 2            # spherical k-means (the default)
    python -m thinkrec.experts --run-dir RUN --cf-model mf --groups 0            # N in 2..10 by silhouette
    python -m thinkrec.experts --run-dir RUN --cf-model mf --groups 2 --cluster ward   # official code's grouping

Clustering happens in the gate's geometry: the gate routes by cosine similarity to the centroids, so the
default groups users by direction (k-means on L2-normalised embeddings, faiss's spherical k-means, best of
`nredo` restarts) and the centroids are the groups' mean directions, both around the users' mean
embedding (see `group_users`). Raw-L2 k-means (`--cluster kmeans`,
the earlier default) lets a few large-norm users (many interactions) form a group of their own: on the
paper's ML-1M split with MF it gave groups of 733 and 7 users. Groups under `min_share` of the clustered
users are reported as `small_groups` (train.py stops on them unless told to go on).

Reads RUN/cf/<model>.safetensors (user_emb [n_users, D]) and RUN/data; writes RUN/experts/groups.safetensors
(labels [n_users] (-1 = not clustered), centroids [N, D], weights [n_users, N+1], route [n_users]) and
RUN/experts/report.json (group sizes, silhouette, Cohen's d (null where infinite: two groups without spread
and with different means), routing counts of all users and of each split's users, the silhouette of each
N tried by the automatic choice). report.json is written first: groups.safetensors marks the phase
complete.

Gate (DESIGN.md "Instance-wise fusion"), for a user embedding e_u (minus the stored `center` mu: the
clustered users' mean for spherical grouping, 0 otherwise) and centroids c_1..c_N:
    w = softmax_n(cos(e_u, c_n) / tau)                         [N]
    if max_n w_n > 0.5 + 0.6 / N:    one-hot on argmax (route 1, "single")
    elif H(w) >= 0.95 log N:         the global adapter alone (route 0, "global"; >= as the official gate)
    else:                            the mixture sum_n w_n LoRA_n, global weight 0 (route 2, "mixture")
Output weights are over E = N + 1 adapters: column 0 = global, columns 1..N = experts.
Special cases, so that no row is NaN and every row sums to 1:
  - zero embeddings (cosine undefined) -> global. Users unseen in training are gated by their CF embedding,
    as the official gate does; the CF models give them the mean trained user vector (cf/*.fill_cold_users),
    which centring makes zero, so with spherical grouping they take the global adapter. `known` False
    forces global (kept for callers that want it);
  - N = 1: the formula gives max(w) = 1 > 1.1 false, H = 0 > 0 false, i.e. a "mixture" of the one expert;
    we return it as what it is, the single expert (route 1).

Routing tables for stage 3 and the fused evaluation (`load_groups`, `train_table`, `table_router`): stage 3
routes each row one-hot to adapter 1 + group; users without a group (none among training rows, by
construction) take the nearest centroid by cosine, as the gate's similarity does.
"""

import argparse
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

from thinkrec.cf.train import load_embeddings
from thinkrec.data.prepared import SPLITS, load_prepared
from thinkrec.errors import UserError
from thinkrec.io import atomic_write_bytes, read_safetensors, require_keys, to_json, write_json

ROUTE_GLOBAL, ROUTE_SINGLE, ROUTE_MIXTURE = 0, 1, 2
GROUPS = "groups.safetensors"  # RUN/experts/<GROUPS>: the phase's completion marker


@dataclass
class GroupConfig:
    """What `build_groups` clusters and how the gate routes (the flags of `python -m thinkrec.experts`)."""

    model: str = "mf"  # CF model whose user embeddings are grouped: RUN/cf/<model>.safetensors
    groups: int = 2  # number of expert groups N (>= 1); 0 = choose N in 2..max_groups by silhouette
    cluster: str = "spherical"  # "spherical" (k-means of directions), "kmeans" (raw L2), "ward" (official)
    users: str = "train"  # whom to cluster: users with training rows, or "all" users of any split (official)
    seed: int = 0
    nredo: int = 5  # k-means restarts, the best objective kept
    max_groups: int = 10  # largest N the automatic choice tries
    min_share: float = 0.05  # a group with fewer of the clustered users is "small" (degenerate)
    center: bool = True  # spherical: directions around the users' mean (clustering and gate), see group_users
    tau: float = 0.1  # softmax temperature over cosine similarities
    single_threshold: float | None = None  # max weight above which one expert is used; None: 0.5 + 0.6/N
    entropy_threshold: float | None = None  # entropy (nats) from which global is used; None: 0.95 log N


def _as_f32(x, name: str) -> np.ndarray:
    x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN/inf")
    return np.ascontiguousarray(x)


CLUSTER_METHODS = ("spherical", "kmeans", "ward")
CLUSTER_USERS = ("train", "all")


class GroupError(UserError, ValueError):
    """No grouping satisfies the request (e.g. no N whose groups all reach the minimum share)."""


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
    on a seeded sample of `max_users` users for large sets (the score is O(n^2)); NaN for one group."""
    from sklearn.metrics import silhouette_score

    x, labels = _as_f32(user_emb, "user_emb"), np.asarray(labels)
    keep = labels >= 0
    if len(np.unique(labels[keep])) < 2:
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
    for n in range(2, min(max_groups, len(x)) + 1):
        labels = cluster(x, n, method, seed=seed, nredo=nredo)
        tried[n] = silhouette(x, labels, seed)
        sizes = np.bincount(labels, minlength=n)
        if sizes.min() >= min_share * len(x) and (best is None or tried[n] > best[2]):
            best = (n, labels, tried[n])
    if best is None:
        raise GroupError(f"no number of groups in 2..{max_groups} gives every group {min_share:.0%} of the "
                         f"{len(x)} users (silhouette by N: {_rounded(tried)})")
    return best[0], best[1], tried


def _rounded(d: dict) -> dict:
    return {k: round(v, 4) for k, v in d.items()}


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


def route_counts(route) -> dict:
    """How many users each route takes: {"global", "single", "mixture"}."""
    route = np.asarray(route)
    return {"global": int((route == ROUTE_GLOBAL).sum()), "single": int((route == ROUTE_SINGLE).sum()),
            "mixture": int((route == ROUTE_MIXTURE).sum())}


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


def group_users(emb: np.ndarray, prep, cfg: GroupConfig):
    """Cluster the users seen in training (cfg.users "all": every user of any split, as the official code),
    gate every user: (tensors for groups.safetensors, report).

    Spherical clustering and the gate see directions around the clustered users' mean embedding mu
    (`center`, stored with the groups): e_u - mu. Some CF models put every user in a narrow cone (SASRec's
    layer-normed states on ML-1M: cosine 0.99 to their mean direction), where raw cosines to any two
    centroids differ by less than the gate's temperature can tell, and every user would be routed global.
    """
    if cfg.users not in CLUSTER_USERS:
        raise GroupError(f"users = {cfg.users!r}, expected one of {CLUSTER_USERS}")
    train = prep.inter.of_split("train")
    known = np.zeros(prep.n_users, bool)
    known[train.user if cfg.users == "train" else prep.inter.user] = True
    emb = _as_f32(emb, "user_emb")
    center = emb[known].mean(0) if cfg.cluster == "spherical" and cfg.center else np.zeros(emb.shape[1], np.float32)
    emb = emb - center
    labels = np.full(prep.n_users, -1, np.int64)
    tried = None
    if cfg.groups == 0:
        n_groups, labels[known], tried = choose_groups(emb[known], cfg.max_groups, cfg.cluster, cfg.seed,
                                                       cfg.min_share, cfg.nredo)
    else:
        n_groups = cfg.groups
        labels[known] = cluster(emb[known], n_groups, cfg.cluster, seed=cfg.seed, nredo=cfg.nredo)
    directions = cfg.cluster == "spherical"
    cents = centroids(emb, labels, n_groups, directions)
    weights, route = gate(emb, cents, cfg.tau, cfg.single_threshold, cfg.entropy_threshold)  # unseen users too
    rows = np.bincount(train.user, minlength=prep.n_users)
    like = np.bincount(train.user, weights=train.label, minlength=prep.n_users) / np.maximum(rows, 1)  # like rate
    # Cohen's d on the embedding in the clustering's geometry (directions for spherical k-means)
    rep = report(labels, route, embedding_cohens_d(_unit(emb) if directions else emb, labels, cents),
                 cohens_d(like, labels))
    rep["silhouette"] = silhouette(emb, labels, cfg.seed)
    rep["small_groups"] = small_groups(rep["group_sizes"], cfg.min_share)
    rep["routing_by_split"] = {name: route_counts(route[np.unique(prep.inter.user[prep.inter.split == k])])
                               for k, name in enumerate(SPLITS)}  # users of each split
    if tried is not None:
        rep["silhouette_by_n"] = _rounded(tried)
    tensors = {"labels": torch.from_numpy(labels), "centroids": torch.from_numpy(cents),
               "weights": torch.from_numpy(weights), "route": torch.from_numpy(route.astype(np.int64)),
               "center": torch.from_numpy(np.ascontiguousarray(center, dtype=np.float32))}
    return tensors, rep


def build_groups(run_dir, cfg: GroupConfig) -> dict:
    """Group and gate the users of RUN (`group_users`), write RUN/experts/groups.safetensors and
    RUN/experts/report.json; return the report."""
    run = Path(run_dir)
    emb = load_embeddings(run, cfg.model, need=("user_emb",))["user_emb"].numpy()
    tensors, rep = group_users(emb, load_prepared(run), cfg)
    rep["args"] = {"run": str(run_dir), **asdict(cfg)}
    write_json(run / "experts" / "report.json", rep)  # +-inf Cohen's d -> null (standard JSON)
    atomic_write_bytes(run / "experts" / GROUPS, st_save(tensors))  # last: marks the phase complete
    print(to_json({k: v for k, v in rep.items() if k != "cohens_d_embedding_matrix"}))
    return rep


def load_groups(run_dir) -> dict:
    """The arrays of RUN/experts/groups.safetensors (labels, centroids, weights, route, center) as numpy."""
    path = Path(run_dir) / "experts" / GROUPS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `python -m thinkrec.experts --run-dir {run_dir}` first")
    redo = f"delete {path.parent}/ to rebuild the expert groups"
    tensors = read_safetensors(path, redo)
    require_keys(path, tensors, ("labels", "centroids", "weights", "route"), redo)
    out = {k: v.numpy() for k, v in tensors.items()}
    out.setdefault("center", np.zeros(out["centroids"].shape[1], np.float32))  # groups written before centring
    return out


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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Cluster CF user embeddings into expert groups and gate users.")
    # Data
    p.add_argument("--run-dir", dest="run", required=True, help="run directory with data/ and cf/")
    p.add_argument("--cf-model", dest="model", default=GroupConfig.model,
                   help="CF model whose user embeddings are grouped (mf|lightgcn|sasrec)")
    # Grouping
    p.add_argument("--groups", type=int, default=GroupConfig.groups,
                   help="number of expert groups N (>= 1); 0 = N in 2..--max-groups by silhouette")
    p.add_argument("--cluster", default=GroupConfig.cluster, choices=CLUSTER_METHODS,
                   help="spherical k-means (cosine, the gate's geometry), raw-L2 k-means, or standard-scaled Ward")
    p.add_argument("--users", default=GroupConfig.users, choices=CLUSTER_USERS,
                   help="cluster the users with training rows, or all users of any split (the official code)")
    p.add_argument("--nredo", type=int, default=GroupConfig.nredo, help="k-means restarts (best objective kept)")
    p.add_argument("--max-groups", type=int, default=GroupConfig.max_groups)
    p.add_argument("--min-share", type=float, default=GroupConfig.min_share,
                   help="groups with fewer of the users are reported as small")
    p.add_argument("--no-center", dest="center", action="store_false",
                   help="spherical: directions of the raw embeddings, not around the users' mean")
    p.add_argument("--seed", type=int, default=GroupConfig.seed)
    # Gate
    p.add_argument("--tau", type=float, default=GroupConfig.tau, help="softmax temperature over cosine similarities")
    p.add_argument("--single-threshold", type=float, default=GroupConfig.single_threshold,
                   help="max weight above which one expert is used; default 0.5 + 0.6/N")
    p.add_argument("--entropy-threshold", type=float, default=GroupConfig.entropy_threshold,
                   help="entropy (nats) from which (>=) global is used; default 0.95 log N")
    args = p.parse_args(argv)
    print(vars(args))
    return build_groups(args.run, GroupConfig(**{f.name: getattr(args, f.name) for f in fields(GroupConfig)}))


if __name__ == "__main__":
    import sys

    from thinkrec.errors import USER_ERRORS

    try:
        main()
    except USER_ERRORS as e:  # the user's input or files: no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
