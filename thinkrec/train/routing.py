"""Per-user adapter weights for stage 3 and the fused evaluation, from `thinkrec.experts`' artifact.

RUN/experts/groups.safetensors (written by `python -m thinkrec.experts`): labels [n_users] (-1 = user not
clustered), centroids [N, D], weights [n_users, N + 1] (the gate; column 0 = global adapter).
Stage 3 routes each row one-hot to adapter 1 + group; users without a group (none among training rows,
by construction) take the nearest centroid by cosine, as the gate's similarity does.
"""

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from thinkrec import experts


def load_groups(run_dir) -> dict:
    path = Path(run_dir) / "experts" / "groups.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `python -m thinkrec.experts --run {run_dir}` first")
    return {k: v.numpy() for k, v in load_file(str(path)).items()}


def train_table(groups: dict, user_emb: np.ndarray) -> np.ndarray:
    """[n_users, N + 1]: each user routed one-hot to adapter 1 + its group (stage 3's training routing)."""
    labels = groups["labels"].copy()
    missing = labels < 0
    if missing.any():
        labels[missing] = np.maximum(experts.assign(user_emb[missing], groups["centroids"]), 0)
    n = len(groups["centroids"])
    w = np.zeros((len(labels), n + 1), np.float32)
    w[np.arange(len(labels)), 1 + labels] = 1.0
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
