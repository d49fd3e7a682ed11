"""Train a CF model on a prepared run directory and export its embeddings.

    python -m thinkrec.cf train --cf-model mf --run-dir RUN                      # default grid for the model
    python -m thinkrec.cf train --cf-model mf --run-dir RUN --lr 1e-3 --dim 256 --weight-decay 1e-6   # one config
    python -m thinkrec.cf train --cf-model lightgcn --run-dir RUN --grid paper   # full paper grid (54 configs)

Writes RUN/cf/<model>.safetensors and RUN/cf/<model>.json (selected config, valid/test metrics, grid).
"""

import argparse
from dataclasses import fields

from thinkrec.errors import number

from .train import GRIDS, MODELS, CFConfig, train_cf


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m thinkrec.cf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="grid-search a CF model on valid AUC and export it")
    # Data
    t.add_argument("--run-dir", dest="run", required=True, help="run directory holding data/ (from python -m thinkrec.data prepare)")
    # Model
    t.add_argument("--cf-model", dest="model", required=True, choices=MODELS)
    t.add_argument("--grid", default=CFConfig.grid, choices=sorted(GRIDS),
                   help="named grid of (lr, dim, weight decay); default: the model's own; ignored when "
                        "--lr/--dim/--weight-decay are all given")
    t.add_argument("--dim", type=number(int, 1), default=CFConfig.dim, help="embedding size")
    t.add_argument("--select", default=CFConfig.select, choices=["auc", "official"],
                   help="selection on valid: AUC or the official AUC/4 + UAUC/3; default: the model's (train.SELECT)")
    # Optimisation
    t.add_argument("--lr", type=number(float, 0, inclusive=False), default=CFConfig.lr, help="Adam learning rate")
    t.add_argument("--weight-decay", type=number(float, 0), default=CFConfig.weight_decay, help="Adam L2 weight decay")
    t.add_argument("--batch-size", type=number(int, 1), default=CFConfig.batch_size, help="rows per step")
    t.add_argument("--max-epochs", type=number(int, 1), default=CFConfig.max_epochs)
    t.add_argument("--patience", type=number(int, 1), default=CFConfig.patience,
                   help="epochs without a better valid score before stopping")
    t.add_argument("--seed", type=number(int, 0), default=CFConfig.seed)
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    t.add_argument("--sasrec-labels", action="store_true",
                   help="SASRec: add each history item's like/dislike label to its embedding (default: the item "
                        "sequence alone, SASRec's own input; labels raise AUC and lower UAUC on ML-1M)")
    t.add_argument("--threads", type=number(int, 1), default=CFConfig.threads,
                   help="torch CPU threads; 1: these models are tiny and 2 threads spin-wait on a busy 2-core box")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    print(vars(args))
    return train_cf(args.run, CFConfig(**{f.name: getattr(args, f.name) for f in fields(CFConfig)}))


if __name__ == "__main__":
    from thinkrec.errors import run_cli

    run_cli("python -m thinkrec.cf", main)
