"""The grouping configuration, the route codes and what the phase writes."""

from dataclasses import dataclass

import numpy as np

from thinkrec.errors import UserError

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

    def __post_init__(self):
        """Values the clustering and the gate can use, or a GroupError naming the flag."""
        import math

        def bad(flag, why):
            raise GroupError(f"--{flag} {getattr(self, flag.replace('-', '_'))!r}: {why}")

        if self.cluster not in CLUSTER_METHODS:
            bad("cluster", f"expected one of {', '.join(CLUSTER_METHODS)}")
        if self.users not in CLUSTER_USERS:
            bad("users", f"expected one of {', '.join(CLUSTER_USERS)}")
        for flag, low in (("groups", 0), ("nredo", 1), ("max-groups", 2), ("seed", 0)):
            if getattr(self, flag.replace("-", "_")) < low:
                bad(flag, f"must be >= {low}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            bad("tau", "must be a number > 0")
        if not (math.isfinite(self.min_share) and 0 <= self.min_share < 1):
            bad("min-share", "must be in [0, 1)")
        for flag in ("single-threshold", "entropy-threshold"):
            v = getattr(self, flag.replace("-", "_"))
            if v is not None and not math.isfinite(v):
                bad(flag, "must be a finite number")


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
