"""The phase: group the run's users, write RUN/experts/ (report.json, then groups.safetensors), read it back."""

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

from thinkrec.cf.train import load_embeddings
from thinkrec.data.prepared import SPLITS, load_prepared
from thinkrec.io import ArtifactError, atomic_write_bytes, read_safetensors, require_keys, to_json, write_json

from .config import GROUPS, GroupConfig, GroupError, _as_f32
from .cluster import _unit, centroids, choose_groups, cluster, silhouette, small_groups
from .gate import gate, route_counts
from .stats import _rounded, cohens_d, embedding_cohens_d, report


def group_users(emb: np.ndarray, prep, cfg: GroupConfig):
    """Cluster the users seen in training (cfg.users "all": every user of any split, as the official code),
    gate every user: (tensors for groups.safetensors, report).

    Spherical clustering and the gate see directions around the clustered users' mean embedding mu
    (`center`, stored with the groups): e_u - mu. Some CF models put every user in a narrow cone (SASRec's
    layer-normed states on ML-1M: cosine 0.99 to their mean direction), where raw cosines to any two
    centroids differ by less than the gate's temperature can tell, and every user would be routed global.
    """
    train = prep.inter.of_split("train")
    known = np.zeros(prep.n_users, bool)
    known[train.user if cfg.users == "train" else prep.inter.user] = True
    if cfg.groups > known.sum():
        raise GroupError(f"--groups {cfg.groups} is more than the {known.sum()} users to cluster (--users {cfg.users})")
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
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    n, (g, dim) = shapes["labels"][0] if len(shapes["labels"]) == 1 else -1, \
        shapes["centroids"] if len(shapes["centroids"]) == 2 else (-1, -1)
    if min(n, g) < 0 or shapes["weights"] != (n, g + 1) or shapes["route"] != (n,) \
            or shapes.get("center", (dim,)) != (dim,):
        raise ArtifactError(f"{path}: shapes do not fit labels [users], centroids [groups, dim], weights "
                            f"[users, groups + 1], route [users], center [dim]: {shapes}; {redo}")
    out = {k: v.numpy() for k, v in tensors.items()}
    out.setdefault("center", np.zeros(out["centroids"].shape[1], np.float32))  # groups written before centring
    return out
