"""The paper's CF baseline rows (ThinkRec Table 2, ML-1M) reproduced: MF, LightGCN, SASRec trained on the
train split, selected on valid AUC (grid + early stopping), scored on test.

    python bench/baselines.py --data ../shared/data/ml1m-collm
    python bench/baselines.py --data ../shared/data/ml1m-collm --models mf --grid paper   # full paper grid
    python bench/baselines.py --data ../shared/data/ml1m-collm --run runs/ml1m           # also export to RUN/cf

Prints, per model, the selected configuration and test AUC / UAUC / NDCG@5 / MAP@5 beside the paper's
row, then one JSON line: {"mf": {"auc", "uauc", "ndcg@5", "map@5"}, "lightgcn": {...}, "sasrec": {...}}.
Budget: the default grids (thinkrec.cf.train.GRIDS) fit 15 minutes on 2 CPU cores for all three models.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from thinkrec.cf.train import GRIDS, MAX_LEN, row_data, save, search, split_metrics  # noqa: E402
from thinkrec.data.prepare import prepare  # noqa: E402

# ThinkRec paper, Table 2, ML-1M rows (AUC, UAUC, NDCG@5, MAP@5)
PAPER = {
    "mf": (0.6401, 0.6079, 0.7286, 0.4520),
    "lightgcn": (0.6140, 0.6230, 0.7333, 0.4600),
    "sasrec": (0.6956, 0.6687, 0.7663, 0.4747),
}
KEYS = ("auc", "uauc", "ndcg@5", "map@5")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/ml1m-collm"),
                   help="directory with the paper split's interactions.csv and items.csv")
    p.add_argument("--run", default=None, help="if given, also export embeddings to RUN/cf/<model>.*")
    # Model
    p.add_argument("--models", default="mf,lightgcn,sasrec", help="comma-separated subset of mf,lightgcn,sasrec")
    p.add_argument("--grid", default=None, choices=sorted(GRIDS), help="one named grid for all models; default: each model's own")
    # Optimisation
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=5, help="epochs without a better valid AUC before stopping")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    print(vars(args), file=sys.stderr)
    torch.set_num_threads(args.threads)
    prep = prepare("csv", data_dir=args.data, quiet=True)
    print(f"data: {len(prep.inter)} rows, {prep.n_users} users, {prep.n_items} items", file=sys.stderr)
    # ---
    results, table, t_all = {}, [], time.perf_counter()
    for name in args.models.split(","):
        grid = GRIDS[args.grid or name]
        t = time.perf_counter()
        data = row_data(prep.inter, prep.n_items, MAX_LEN if name == "sasrec" else 0)
        model, best, _, _ = search(name, prep, grid, seed=args.seed, data=data, batch_size=args.batch_size,
                                   max_epochs=args.max_epochs, patience=args.patience)
        valid, test = split_metrics(model, data, "valid"), split_metrics(model, data, "test")
        seconds = time.perf_counter() - t
        results[name] = {k: round(test[k], 4) for k in KEYS}
        cfg = f"lr={best['lr']:g} dim={best['dim']} wd={best['weight_decay']:g} ep={best['best_epoch'] + 1}"
        n_cfg = len(grid["lr"]) * len(grid["dim"]) * len(grid["weight_decay"])
        table.append((name, "ours", [test[k] for k in KEYS], f"{cfg}  valid AUC {valid['auc']:.4f}  {n_cfg} cfgs {seconds:.0f}s"))
        table.append((name, "paper", list(PAPER[name]), ""))
        if args.run:
            save(args.run, name, model, prep, {"selected": best, "grid": grid, "valid": valid, "test": test})
    # ---
    print(f"{'model':<9} {'row':<6} " + " ".join(f"{k:>7}" for k in KEYS) + "  selection")
    for name, row, vals, note in table:
        print(f"{name:<9} {row:<6} " + " ".join(f"{v:7.4f}" for v in vals) + f"  {note}")
    print(f"total {time.perf_counter() - t_all:.0f} s on {args.threads} threads")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
