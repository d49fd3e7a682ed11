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

Modules: config (GroupConfig, route codes, GroupError), cluster (clustering, silhouette, centroids), gate (the
gate and the routing tables), stats (Cohen's d, the report), build (the phase: RUN/experts/ written and read),
__main__ (the CLI).

Routing tables for stage 3 and the fused evaluation (`load_groups`, `train_table`, `table_router`): stage 3
routes each row one-hot to adapter 1 + group; users without a group (none among training rows, by
construction) take the nearest centroid by cosine, as the gate's similarity does.
"""

from .config import CLUSTER_METHODS, CLUSTER_USERS, GROUPS, GroupConfig, GroupError, ROUTE_GLOBAL, ROUTE_MIXTURE, ROUTE_SINGLE
from .cluster import centroids, choose_groups, cluster, silhouette, small_groups
from .gate import assign, gate, one_hot_experts, route_counts, routing_counts, table_router, train_table
from .stats import cohens_d, embedding_cohens_d, report
from .build import build_groups, group_users, load_groups

__all__ = ["ROUTE_GLOBAL", "ROUTE_SINGLE", "ROUTE_MIXTURE", "GROUPS", "GroupConfig", "CLUSTER_METHODS", "CLUSTER_USERS", "GroupError", "cluster", "silhouette", "choose_groups", "small_groups", "centroids", "assign", "gate", "route_counts", "train_table", "one_hot_experts", "table_router", "routing_counts", "cohens_d", "embedding_cohens_d", "report", "group_users", "build_groups", "load_groups"]
