"""User groups on the paper's ML-1M split: sizes, silhouette and Cohen's d for each CF model's user
embeddings: raw-L2 k-means with one run (the earlier default, `kmeans:1`) and with restarts, against
spherical k-means (the default now) and the official standard-scaled Ward.

    python bench/groups.py                        # MF, LightGCN, SASRec (dim 256, train.py's CF schedule), N = 2
    python bench/groups.py --groups 0             # N in 2..10 by silhouette (--experts auto)

The CF models are trained once into the prepared ML-1M temp dir (train.py's fixed schedule: lr 1e-3, dim
256, weight decay 1e-6, up to 30 epochs, patience 3) and reused. Nothing is written to RUN/experts: each
grouping is computed in memory (thinkrec.experts.group_users). Silhouette is under cosine distance (the
gate's geometry) for every method, so the columns compare. Prints a table, then one JSON line.
"""

import argparse
import tempfile
from pathlib import Path

from _util import ml1m_prepared, print_json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=2, help="N (0 = by silhouette in 2..10)")
    ap.add_argument("--models", default="mf,lightgcn,sasrec")
    ap.add_argument("--methods", default="kmeans:1,kmeans,spherical,ward",
                    help="clusterings, METHOD[:NREDO]; kmeans:1 is the earlier default (raw L2, one run)")
    a = ap.parse_args()

    from thinkrec.cf import CFConfig, train_cf
    from thinkrec.cf.train import load_embeddings
    from thinkrec.experts import GroupConfig, GroupError, group_users

    prep = ml1m_prepared()
    run = Path(tempfile.gettempdir()) / "thinkrec-bench-ml1m"
    rows = []
    for model in a.models.split(","):
        if not (run / "cf" / f"{model}.safetensors").exists():
            print(f"training {model} on ML-1M ...", flush=True)
            train_cf(run, CFConfig(model=model, lr=1e-3, dim=256, weight_decay=1e-6, max_epochs=30, patience=3))
        emb = load_embeddings(run, model, need=("user_emb",))["user_emb"].numpy()
        for method in a.methods.split(","):
            name, _, nredo = method.partition(":")
            try:
                _, rep = group_users(emb, prep, GroupConfig(model=model, groups=a.groups, cluster=name,
                                                            nredo=int(nredo or GroupConfig.nredo)))
            except GroupError as e:
                rows.append({"model": model, "method": method, "error": str(e)})
                continue
            rows.append({"model": model, "method": method, "group_sizes": rep["group_sizes"],
                         "silhouette": round(rep["silhouette"], 4),
                         "cohens_d_embedding": round(rep["cohens_d_embedding"], 3),
                         "cohens_d_like_rate": round(rep["cohens_d_like_rate"], 3),
                         "small_groups": rep["small_groups"], "routing_test_users": rep["routing_by_split"]["test"],
                         **({"silhouette_by_n": rep["silhouette_by_n"]} if "silhouette_by_n" in rep else {})})
    print("\n| CF model | clustering | group sizes | silhouette (cosine) | Cohen's d embedding | Cohen's d like rate "
          "| test users: global / single / mixture |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['method']} | {r['error']} | | | | |")
            continue
        t = r["routing_test_users"]
        small = " (small)" if r["small_groups"] else ""
        print(f"| {r['model']} | {r['method']} | {r['group_sizes']}{small} | {r['silhouette']:.3f} | "
              f"{r['cohens_d_embedding']:.2f} | {r['cohens_d_like_rate']:.2f} | "
              f"{t['global']} / {t['single']} / {t['mixture']} |")
    print_json({"bench": "groups", "groups": a.groups, "results": rows})


if __name__ == "__main__":
    main()
