"""Score, rank and explain with a trained ThinkRec run (the fused model: each user's gate weights over the
LoRA experts).

    python infer.py                                          # runs/ml100k: train.py's test rows -> runs/ml100k/infer/
    python infer.py --run-dir RUN --max-rows 0               # the whole test split
    python infer.py --run-dir RUN --input rows.jsonl --out scored/     # your rows (see thinkrec/infer/rows.py)
    python infer.py --run-dir RUN --rank --user 42 --candidates all --top 10
    python infer.py --run-dir RUN --explain 8                # the model's reasoning for 8 test rows

Scoring writes OUT/scores.jsonl (one line per row: ids, label, score = Yes logit, prob, the CF model's
score, the like-rate floor's, route, weights) and OUT/metrics.json (AUC, UAUC, NDCG@5, MAP@5, HR@5 beside the
CF model's and the like-rate floor's on the same rows; routing counts; rows/s; on the paper's ML-1M split also the official 25% test sample). Rows go
in length-bucketed batches under --batch-tokens that mix users and routes; a killed run started again with
the same arguments continues where it stopped (OUT/scores.partial.jsonl), and scores.jsonl appears whole.
Bad input stops before anything is scored, with the file and line, exit status 2.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from thinkrec.data.history import HISTORY_RULES
from thinkrec.data.prompts import TITLE_STYLES
from thinkrec.errors import number, run_cli
from thinkrec.infer import load_run, read_input, score_rows, split_rows
from thinkrec.infer.rows import official_sample
from thinkrec.model import fused
from thinkrec.infer.run import run_arg, train_args
from thinkrec.io import RunLock, to_json
from thinkrec.precision import PRECISIONS
from thinkrec.recipe import RECIPES
from thinkrec.stages import STAGES
from thinkrec.runtime import quiet_progress, tune_malloc

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/ml100k", help="a run of train.py")
    p.add_argument("--out", default=None, help="output directory (default RUN/infer)")
    p.add_argument("--model", default=None, help="base model, when the one recorded with the adapters moved")
    p.add_argument("--stage", default=None, choices=STAGES,
                   help="score with this stage's adapters (default the last finished one; stage2 on the train "
                        "split chooses the samples for reasoning traces, as the official recipe does)")
    # what to score
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--max-rows", type=number(int, 0), default=None,
                   help="rows of the split (0 = all; default: the rows train.py scored, --max-test-samples)")
    p.add_argument("--rows", default=None, choices=["split", "official"],
                   help="the whole split or its official 25%% sample (default: for the test split, what train.py "
                        "scored, its --test-rows; else the split)")
    p.add_argument("--input", default=None, help="JSON Lines of rows to score instead of a split")
    p.add_argument("--allow-unknown", action="store_true",
                   help="score unknown user/item ids (global adapter, zero CF vector) instead of stopping")
    p.add_argument("--prompt", default="reason", choices=["reason", "ids", "text"],
                   help="reason: the paper's C.3 recommendation prompt with CF ids (what the official evaluation "
                        "scores); ids: the stage-2/3 training prompt; text: stage 1's, without ids")
    p.add_argument("--recipe", default=None, choices=RECIPES,
                   help="the run's recipe (train.py --recipe, RUN/recipe.json; the default): its prompt style and "
                        "answer tokens; naming another stops")
    p.add_argument("--history", default=None, choices=HISTORY_RULES,
                   help="history rule of the prompts (default the run's, train.py --history): strict = earlier "
                        "timestamps only; file = also earlier rows of the same second (official)")
    p.add_argument("--titles", default=None, choices=TITLE_STYLES,
                   help="item titles in prompts (default the run's, train.py --titles)")
    p.add_argument("--mix", default="delta", choices=["delta", "linear"],
                   help="mixture of experts: sum_e w_e B_e A_e (exact), or peft's linear combination")
    # how
    p.add_argument("--batch-tokens", type=number(int, 1), default=8192, help="rows x longest prompt per batch")
    p.add_argument("--batch-size", type=number(int, 1), default=64, help="most rows per batch")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="fp32 | bf16 | int8 (CPU: frozen linears as int8 GEMMs, LoRA deltas fp32) | auto "
                        "(default: the precision the run trained in, RUN/precision.json; fp32 for older runs)")
    p.add_argument("--threads", type=number(int, 0), default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--fused-ops", action="store_true",
                   help="compile the element-wise ops of each layer (RMSNorm, SiLU * up, RoPE) with torch.compile on "
                        "CPU: ~10 s of compiling once, then faster scoring (bench/infer_throughput.py --fused-ops); needs a C++ "
                        "compiler")
    p.add_argument("--overwrite", action="store_true", help="start over instead of continuing OUT/scores.partial.jsonl")
    p.add_argument("--no-progress", action="store_true")
    # ranking
    p.add_argument("--rank", action="store_true", help="rank candidate items for one user (--user)")
    p.add_argument("--user", default=None, help="raw user id to rank for")
    p.add_argument("--candidates", default="all", help="'all' items the user has not rated, or a file of item ids")
    p.add_argument("--top", type=number(int, 1), default=10)
    # explanations
    p.add_argument("--explain", type=number(int, 0), default=0, help="generate the model's reasoning for this many rows")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=512)
    p.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 = greedy (official: 0.4 with sampling)")
    p.add_argument("--top-p", type=number(float, 0, inclusive=False), default=1.0)
    p.add_argument("--repetition-penalty", type=number(float, 0, inclusive=False), default=1.0, help="official 1.2")
    p.add_argument("--no-repeat-ngram", type=number(int, 0), default=0, help="official 2")
    p.add_argument("--seed", type=number(int, 0), default=0, help="sampling seed")
    p.add_argument("--references", default=None, help="JSON Lines {row, reason} of reference explanations "
                   "(default RUN/reasoning/traces.jsonl when present)")
    p.add_argument("--bleurt-checkpoint", default=None, help="a local BLEURT checkpoint directory")
    a = p.parse_args(argv)
    for flag in ("batch_tokens", "batch_size", "top", "max_new_tokens"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if a.max_rows is not None and a.max_rows < 0:
        p.error("--max-rows must be >= 0")
    if a.rank and a.user is None:
        p.error("--rank needs --user")
    a.run_dir = Path(a.run_dir)
    a.out = Path(a.out) if a.out else a.run_dir / "infer"
    return a


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.no_progress:
        quiet_progress()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fused_ops:
        fused.enable(check=True)
    loaded = load_run(args.run_dir, model=args.model, mix=args.mix, precision=args.precision, stage=args.stage,
                      history=args.history, titles=args.titles, recipe=args.recipe)
    log(f"precision: {loaded.precision.describe()}")
    mode = args.prompt
    if args.rank:
        from thinkrec.infer.rank import rank_cli

        return rank_cli(loaded, args, mode, log)
    targs = train_args(args.run_dir)
    if args.input:
        rows = read_input(args.input, loaded.prep, allow_unknown=args.allow_unknown, max_rows=args.max_rows or 0)
        official = None
    else:
        n = args.max_rows if args.max_rows is not None else int(run_arg(targs, "max_test_samples", 0))
        seed = int(run_arg(targs, "seed", 0)) + 2  # train.py draws its test rows with seed + 2
        which = args.rows or (run_arg(targs, "test_rows", "split") if args.split == "test" else "split")
        sample = official_sample(loaded.prep, run_arg(targs, "data_dir"), args.split)
        rows = split_rows(loaded.prep, args.split, n if args.split == "test" else (args.max_rows or 0), seed,
                          rows=sample if which == "official" else None)
        pos = np.flatnonzero(np.isin(rows.data_row, sample))
        official = (pos, f"official 25% {args.split} sample ({len(pos)} of its {len(sample)} rows scored)")
    if args.explain:
        from thinkrec.infer.explain import explain_cli

        return explain_cli(loaded, rows, args, log)
    with RunLock(args.out, "infer.py"):
        log(f"scoring {len(rows)} rows of {rows.source} with {loaded.stage} ({mode} prompt, {args.mix} mixtures) "
            f"-> {args.out}")
        m = score_rows(loaded, rows, args.out, mode, args.batch_tokens, args.batch_size, not args.no_progress,
                       args.overwrite, log, official_rows=official)
    print(to_json({k: m[k] for k in ("all", "official_sample", "routing", "rows_per_s") if k in m}), flush=True)
    return m


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tune_malloc()  # large activations reuse freed heap blocks instead of fresh pages (thinkrec/runtime.py)
    run_cli("infer.py", main)
