"""The paper's CF baseline rows (ThinkRec Table 2, ML-1M) reproduced: MF, LightGCN, SASRec trained on the
train split, selected on valid AUC (grid + early stopping; `--select official`: AUC/4 + UAUC/3), scored
on test.

    python bench/baselines.py --data-dir ../shared/data/ml1m-collm
    python bench/baselines.py --data-dir ../shared/data/ml1m-collm --models mf --grid paper   # full paper grid
    python bench/baselines.py --data-dir ../shared/data/ml1m-collm --run-dir runs/ml1m       # also export to RUN/cf
    python bench/baselines.py --data-dir ../shared/data/ml1m-collm --models mf,mf-nobias     # CoLLM's bias-free MF too

Prints, per model, the selected configuration and test AUC / UAUC / NDCG@5 / MAP@5 beside the paper's
row; the like-rate floor (thinkrec.cf.likerate: smoothed user and item like rates, no training); and where
MF's signal sits: each MF (the grid's pick and train.py's fixed configuration, `mf-train.py`) scored by its
bias terms alone (b_u + c_i + g) and by its dot product alone (<P_u, Q_i>), the part stage 2 projects.
Then one JSON line: {"mf": {"auc", "uauc", "ndcg@5", "map@5"}, ..., "like-rate": {...},
"mf_parts": {"mf": {"full": {...}, "biases": {...}, "dot": {...}}, "mf-train.py": {...}}}.
Budget: the default grids (thinkrec.cf.train.GRIDS) fit 15 minutes on 2 CPU cores for all three models
(measured ~5 minutes of CPU on one thread); the table gives wall and CPU (process) seconds per model.
"""

import argparse
import sys

import torch
from _util import ML1M, Stopwatch, print_json

from thinkrec.cf import likerate
from thinkrec.cf.train import GRIDS, MAX_LEN, MODELS, CFConfig, mf_parts, row_data, save, search, split_metrics
from thinkrec.data.prepare import prepare
from thinkrec.metrics import evaluate

# ThinkRec paper, Table 2, ML-1M rows (AUC, UAUC, NDCG@5, MAP@5)
PAPER = {
    "mf": (0.6401, 0.6079, 0.7286, 0.4520),
    "lightgcn": (0.6140, 0.6230, 0.7333, 0.4600),
    "sasrec": (0.6956, 0.6687, 0.7663, 0.4747),
}
KEYS = ("auc", "uauc", "ndcg@5", "map@5")
# train.py's MF: one fixed configuration, no grid (train.py, "CF model and expert groups")
TRAIN_PY_MF = {"lr": [1e-3], "dim": [256], "weight_decay": [1e-6]}
TRAIN_PY_FIT = {"max_epochs": 30, "patience": 3}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    p.add_argument("--data-dir", dest="data", default=str(ML1M),
                   help="directory with the paper split's interactions.csv and items.csv")
    p.add_argument("--run-dir", dest="run", default=None, help="if given, also export embeddings to RUN/cf/<model>.*")
    # Model
    p.add_argument("--models", default="mf,lightgcn,sasrec",
                   help="comma-separated subset of mf,lightgcn,sasrec,mf-nobias (CoLLM's MF: no bias terms; no paper row)")
    p.add_argument("--grid", default=None, choices=sorted(GRIDS), help="one named grid for all models; default: each model's own")
    p.add_argument("--select", default=None, choices=["auc", "official"],
                   help="selection on valid: AUC or the official AUC/4 + UAUC/3; default: thinkrec.cf.train.SELECT")
    # Optimisation
    p.add_argument("--max-epochs", type=int, default=CFConfig.max_epochs)
    p.add_argument("--patience", type=int, default=CFConfig.patience,
                   help="epochs without a better valid score before stopping")
    p.add_argument("--batch-size", type=int, default=CFConfig.batch_size)
    p.add_argument("--seed", type=int, default=CFConfig.seed)
    p.add_argument("--threads", type=int, default=CFConfig.threads,
                   help="torch CPU threads; 1 by default: these models are tiny and with 2 threads on a busy 2-core "
                        "box OpenMP spin-waits made steps up to 5x slower")
    args = p.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        p.error(f"--models {args.models}: {', '.join(unknown)} not one of {', '.join(MODELS)}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    print(vars(args), file=sys.stderr)
    torch.set_num_threads(args.threads)
    prep = prepare("csv", data_dir=args.data, quiet=True)
    print(f"data: {len(prep.inter)} rows, {prep.n_users} users, {prep.n_items} items", file=sys.stderr)
    # ---
    results, table, parts, total = {}, [], {}, Stopwatch()
    for name in args.models.split(","):
        grid = GRIDS[args.grid or name]
        clock = Stopwatch()
        data = row_data(prep.inter, prep.n_items, MAX_LEN if name == "sasrec" else 0)
        model, best, _, _ = search(name, prep, grid, seed=args.seed, data=data, batch_size=args.batch_size,
                                   max_epochs=args.max_epochs, patience=args.patience,
                                   **({"select": args.select} if args.select else {}))
        valid, test = split_metrics(model, data, "valid"), split_metrics(model, data, "test")
        seconds, cpu = clock.wall(), clock.cpu()
        results[name] = {k: round(test[k], 4) for k in KEYS}
        cfg = f"lr={best['lr']:g} dim={best['dim']} wd={best['weight_decay']:g} ep={best['best_epoch'] + 1}"
        n_cfg = len(grid["lr"]) * len(grid["dim"]) * len(grid["weight_decay"])
        note = (f"{cfg}  sel {best['select']} valid {valid['auc']:.4f}/{valid['uauc']:.4f}  {n_cfg} cfgs "
                f"{seconds:.0f}s wall {cpu:.0f}s cpu")
        table.append((name, "ours", [test[k] for k in KEYS], note))
        if name in PAPER:
            table.append((name, "paper", list(PAPER[name]), ""))
        if args.run:
            save(args.run, name, model, prep, {"selected": best, "grid": grid, "valid": valid, "test": test})
        if name == "mf":
            parts["mf"] = mf_parts(model, data, "test")
    # --- the floor: like rates, no training
    clock = Stopwatch()
    rates = likerate.fit(prep)
    te = prep.inter.of_split("test")
    test = evaluate(te.user, rates.score(te.user, te.item), te.label)
    results["like-rate"] = {k: round(test[k], 4) for k in KEYS}
    table.append(("like-rate", "ours", [test[k] for k in KEYS], f"prior {rates.prior:g} (valid AUC)  "
                  f"{clock.wall():.1f}s wall"))
    # --- where MF's signal sits: train.py's MF, its biases alone and its dot product alone
    if "mf" in args.models.split(","):
        data = row_data(prep.inter, prep.n_items)
        model, _, _, _ = search("mf", prep, TRAIN_PY_MF, seed=args.seed, data=data, batch_size=args.batch_size,
                                **TRAIN_PY_FIT)
        parts["mf-train.py"] = mf_parts(model, data, "test")
    results["mf_parts"] = {m: {part: {k: round(v[k], 4) for k in KEYS} for part, v in d.items()}
                           for m, d in parts.items()}
    # ---
    print(f"{'model':<9} {'row':<6} " + " ".join(f"{k:>7}" for k in KEYS) + "  selection")
    for name, row, vals, note in table:
        print(f"{name:<9} {row:<6} " + " ".join(f"{v:7.4f}" for v in vals) + f"  {note}")
    if parts:  # MF's (with biases) only
        print("\nwhere MF's signal sits (test split): the full logit, b_u + c_i + g alone, <P_u, Q_i> alone")
        print(f"{'model':<12} {'part':<7} " + " ".join(f"{k:>7}" for k in KEYS))
        for name, d in parts.items():
            for part, m in d.items():
                print(f"{name:<12} {part:<7} " + " ".join(f"{m[k]:7.4f}" for k in KEYS))
    print(f"total {total.wall():.0f} s wall, {total.cpu():.0f} s cpu on {args.threads} threads")
    print_json(results)
    return results


if __name__ == "__main__":
    main()
