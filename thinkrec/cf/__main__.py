"""Train a CF model on a prepared run directory and export its embeddings.

    python -m thinkrec.cf train --model mf --run RUN                      # default grid for the model
    python -m thinkrec.cf train --model mf --run RUN --lr 1e-3 --dim 256 --weight-decay 1e-6   # one config
    python -m thinkrec.cf train --model lightgcn --run RUN --grid paper   # full paper grid (54 configs)

Writes RUN/cf/<model>.safetensors and RUN/cf/<model>.json (selected config, valid/test metrics, grid).
"""

import argparse
import json
import time

import torch

from thinkrec.data.prepared import load_prepared

from .train import GRIDS, MODELS, save, search, split_metrics


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m thinkrec.cf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="grid-search a CF model on valid AUC and export it")
    # Data
    t.add_argument("--run", required=True, help="run directory holding data/ (from python -m thinkrec.data prepare)")
    # Model
    t.add_argument("--model", required=True, choices=MODELS)
    t.add_argument("--grid", default=None, choices=sorted(GRIDS),
                   help="named grid of (lr, dim, weight decay); default: the model's own; ignored when "
                        "--lr/--dim/--weight-decay are all given")
    t.add_argument("--dim", type=int, default=None, help="embedding size")
    t.add_argument("--select", default=None, choices=["auc", "official"],
                   help="selection on valid: AUC or the official AUC/4 + UAUC/3; default: the model's (train.SELECT)")
    # Optimisation
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    t.add_argument("--weight-decay", type=float, default=None, help="Adam L2 weight decay")
    t.add_argument("--batch-size", type=int, default=2048, help="rows per step")
    t.add_argument("--max-epochs", type=int, default=100)
    t.add_argument("--patience", type=int, default=5, help="epochs without a better valid score before stopping")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--sasrec-labels", action="store_true",
                   help="SASRec: add each history item's like/dislike label to its embedding (default: the item "
                        "sequence alone, SASRec's own input; labels raise AUC and lower UAUC on ML-1M)")
    t.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1: these models are tiny and 2 threads spin-wait on a busy 2-core box")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    print(vars(args))
    torch.set_num_threads(args.threads)
    prep = load_prepared(args.run)
    grid = dict(GRIDS[args.grid or args.model])
    for key, value in (("lr", args.lr), ("dim", args.dim), ("weight_decay", args.weight_decay)):
        if value is not None:
            grid[key] = [value]
    # ---
    t = time.perf_counter()
    model, best, results, data = search(args.model, prep, grid, seed=args.seed, batch_size=args.batch_size,
                                        max_epochs=args.max_epochs, patience=args.patience,
                                        model_kw={"use_labels": True} if args.sasrec_labels and args.model == "sasrec" else None,
                                        **({"select": args.select} if args.select else {}))
    info = {"args": vars(args), "grid": grid, "selected": best, "results": results,
            "valid": split_metrics(model, data, "valid"), "test": split_metrics(model, data, "test"),
            "seconds": round(time.perf_counter() - t, 1)}
    path = save(args.run, args.model, model, prep, info)
    print(json.dumps({"model": args.model, "selected": best, "valid": info["valid"], "test": info["test"], "saved": str(path)}))
    return info


if __name__ == "__main__":
    main()
