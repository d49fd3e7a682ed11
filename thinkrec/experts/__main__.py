"""python -m thinkrec.experts: group a run's users and build the gate (RUN/experts/)."""

import argparse
from dataclasses import fields

from thinkrec.errors import number

from .config import CLUSTER_METHODS, CLUSTER_USERS, GroupConfig
from .build import build_groups


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m thinkrec.experts",
                                description="Cluster CF user embeddings into expert groups and gate users.")
    # Data
    p.add_argument("--run-dir", dest="run", required=True, help="run directory with data/ and cf/")
    p.add_argument("--cf-model", dest="model", default=GroupConfig.model,
                   help="CF model whose user embeddings are grouped (mf|lightgcn|sasrec)")
    # Grouping
    p.add_argument("--groups", type=number(int, 0), default=GroupConfig.groups,
                   help="number of expert groups N (>= 1); 0 = N in 2..--max-groups by silhouette")
    p.add_argument("--cluster", default=GroupConfig.cluster, choices=CLUSTER_METHODS,
                   help="spherical k-means (cosine, the gate's geometry), raw-L2 k-means, or standard-scaled Ward")
    p.add_argument("--users", default=GroupConfig.users, choices=CLUSTER_USERS,
                   help="cluster the users with training rows, or all users of any split (the official code)")
    p.add_argument("--nredo", type=number(int, 1), default=GroupConfig.nredo, help="k-means restarts (best objective kept)")
    p.add_argument("--max-groups", type=number(int, 2), default=GroupConfig.max_groups)
    p.add_argument("--min-share", type=number(float, 0), default=GroupConfig.min_share,
                   help="groups with fewer of the users are reported as small")
    p.add_argument("--no-center", dest="center", action="store_false",
                   help="spherical: directions of the raw embeddings, not around the users' mean")
    p.add_argument("--seed", type=number(int, 0), default=GroupConfig.seed)
    # Gate
    p.add_argument("--tau", type=number(float, 0, inclusive=False), default=GroupConfig.tau, help="softmax temperature over cosine similarities")
    p.add_argument("--single-threshold", type=float, default=GroupConfig.single_threshold,
                   help="max weight above which one expert is used; default 0.5 + 0.6/N")
    p.add_argument("--entropy-threshold", type=float, default=GroupConfig.entropy_threshold,
                   help="entropy (nats) from which (>=) global is used; default 0.95 log N")
    args = p.parse_args(argv)
    print(vars(args))
    return build_groups(args.run, GroupConfig(**{f.name: getattr(args, f.name) for f in fields(GroupConfig)}))


if __name__ == "__main__":
    from thinkrec.errors import run_cli

    run_cli("python -m thinkrec.experts", main)
