"""Command line of the data layer.

    python -m thinkrec.data prepare --dataset ml1m --data-dir ~/data/ml-1m --run-dir runs/ml1m
    python -m thinkrec.data prepare --dataset csv --data-dir ../shared/data/ml1m-collm --noun movie --run-dir runs/x
    python -m thinkrec.data prompt --run-dir runs/ml1m --split test --row 0 --mode reason
    python -m thinkrec.data prompt --run-dir runs/ml1m --split test --row 0 --history file     # the official ties rule
    python -m thinkrec.data prompt --run-dir runs/ml1m --split test --row 0 --mode ids --recipe official

`--recipe official` prints the exact string the authors' code builds (thinkrec.recipe: its prompt files,
history rule and titles; a flag given beside it wins); on `prepare` it changes nothing (both recipes
prepare the same data; titles and histories are applied when prompts are built).
"""

import argparse
import sys

import numpy as np

from thinkrec.errors import USER_ERRORS, report
from thinkrec.recipe import RECIPES
from thinkrec.recipe import get as get_recipe

from . import prompts
from .errors import DataError
from .history import HISTORY_RULES, build_histories
from .prepare import prepare
from .prepared import SPLITS, load_prepared


def prompt_text(run, split: str, row: int, mode: str = "reason", keywords=None, history: str = "strict",
                titles: str = "full", style: str = "ours") -> str:
    """The full prompt (placeholders as text) of the `row`-th sample of `split`, then its answer."""
    prep = prompts.with_titles(load_prepared(run), titles)
    rows = np.flatnonzero(prep.inter.split == SPLITS.index(split))
    if not 0 <= row < len(rows):
        raise DataError(f"--row {row}: split {split!r} has {len(rows)} rows")
    r = int(rows[row])
    inter = prep.inter
    hist = build_histories(inter.user, inter.timestamp, 10, history)[r]
    kw = prompts.load_keywords(keywords, prep.items) if keywords else prompts.run_keywords(run, prep.items)
    noun = prep.stats.get("noun") or prompts.NOUNS.get(prep.stats.get("dataset"), "item")
    history = [(int(inter.item[h]), int(inter.label[h])) for h in hist if h >= 0]
    head, groups, tail = prompts.render(prep.items, history, int(inter.item[r]), int(inter.user[r]), noun, mode,
                                        keywords=kw, style=style)
    return prompts.to_text(head + [s for g in groups for s in g] + tail) + prompts.answer_text(inter.label[r], style)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m thinkrec.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="read a dataset, split it by time, write RUN/data")
    p.add_argument("--dataset", required=True, help="ml1m | ml100k | amazon-book | yelp | csv")
    p.add_argument("--data-dir", default=None, help="where the raw files are (default: download / offline mirror)")
    p.add_argument("--run-dir", dest="out", required=True, help="run directory; writes RUN/data")
    p.add_argument("--noun", default=None, help="noun in prompts (default: movie / book / business; csv: item)")
    p.add_argument("--mirror", default=None, help="ml100k only: recbole (default, PyPI wheel) or grouplens")
    p.add_argument("--recipe", default=None, choices=RECIPES, help="accepted for symmetry: both recipes prepare "
                   "the same data (titles and histories are applied when prompts are built)")
    q = sub.add_parser("prompt", help="print one sample's full prompt")
    q.add_argument("--run-dir", dest="run", required=True)
    q.add_argument("--split", default="test", choices=SPLITS)
    q.add_argument("--row", type=int, default=0, help="row number within the split (0-based)")
    q.add_argument("--mode", default="reason", choices=prompts.MODES)
    q.add_argument("--keywords", default=None, help="keyword JSON Lines (default RUN/data/keywords.jsonl if present)")
    q.add_argument("--recipe", default="ours", choices=RECIPES,
                   help="official: the authors' prompt files verbatim, their history rule and titles")
    q.add_argument("--titles", default=None, choices=prompts.TITLE_STYLES,
                   help="item titles: full, or no-year (the official code's ML-1M titles); default the recipe's")
    q.add_argument("--history", default=None, choices=HISTORY_RULES,
                   help="strict: earlier timestamps only; file: also earlier rows of the same second (official); "
                        "default the recipe's")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "prepare":
            opts = {"mirror": args.mirror} if args.mirror else {}
            prepare(args.dataset, data_dir=args.data_dir, out=args.out, noun=args.noun, **opts)
        else:
            rec = get_recipe(args.recipe)
            print(prompt_text(args.run, args.split, args.row, args.mode, args.keywords, args.history or rec.history,
                              args.titles or rec.titles, rec.prompts))
    except USER_ERRORS as e:
        return report("python -m thinkrec.data", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
