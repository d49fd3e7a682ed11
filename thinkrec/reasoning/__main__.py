"""Thinking-activation data: reasoning traces from a teacher, and item keywords.

    python -m thinkrec.reasoning synth --dataset ml100k --teacher local --select random --n 64
    python -m thinkrec.reasoning synth --run-dir runs/ml1m --teacher http://localhost:8000/v1 --teacher-model Qwen/QwQ-32B \\
        --select errors --scores runs/ml1m/infer-train/scores.jsonl
    python -m thinkrec.reasoning keywords --dataset amazon-book --teacher http://localhost:8000/v1 --teacher-model M

synth writes RUN/reasoning/traces.jsonl (and .failures.jsonl beside it), which train.py reads by default;
keywords writes RUN/data/keywords.jsonl. RUN defaults to runs/<dataset>, as for train.py; its data is
prepared there first when missing. API keys for an HTTP teacher come from $THINKREC_TEACHER_API_KEYS (one
or several, comma-separated; they rotate) or $OPENAI_API_KEY. Both jobs continue where a killed run stopped.
"""

import argparse
import os
import sys
from pathlib import Path

from thinkrec.data import DataError
from thinkrec.data.history import HISTORY_RULES
from thinkrec.data.prompts import TITLE_STYLES, with_titles
from thinkrec.data.prompts import load_keywords
from thinkrec.errors import number
from thinkrec.io import to_json
from thinkrec.rundir import RunDir

from .files import load_data
from .synth import SELECT, select_rows, synthesize


def synth_main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m thinkrec.reasoning synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml100k")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--run-dir", dest="run", default=None, help="run directory (default runs/<dataset>; its data is prepared there "
                   "first when missing)")
    p.add_argument("--noun", default=None, help="the prompts' noun (default the data's: movie / book / business)")
    p.add_argument("--titles", default="full", choices=TITLE_STYLES, help="item titles, as train.py --titles")
    p.add_argument("--history", default="strict", choices=HISTORY_RULES,
                   help="history rule of the teacher's prompt, as train.py --history (file: the official ties rule)")
    p.add_argument("--teacher", default="local", help="'facts' (offline: traces that state counts from the training "
                   "data, not the paper's teacher), an OpenAI-compatible base URL (http://host:8000/v1), "
                   "'local' (the embedded SmolLM2-135M) or 'local:MODEL' (an HF id or directory)")
    p.add_argument("--teacher-model", dest="model", default=None, help="model name the server serves (HTTP teachers)")
    p.add_argument("--select", default="random", choices=SELECT)
    p.add_argument("--scores", default=None, help="infer.py scores.jsonl on the train split (--select errors)")
    p.add_argument("--rows", default=None, help="file of data rows (--select rows)")
    p.add_argument("--n", type=int, default=2000, help="at most this many samples (0 = every selected row)")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--max-rounds", type=int, default=6, help="reflect rounds before a sample counts as failed")
    p.add_argument("--max-tokens", type=int, default=1024, help="per reply (raised by 512 up to 3000 when empty)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--timeout", type=number(float, 0, inclusive=False), default=120.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=6, help="retries per request (backoff with jitter)")
    p.add_argument("--temperature", type=number(float, 0), default=None)
    p.add_argument("--out", default=None, help="traces file (default RUN/reasoning/traces.jsonl)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for flag in ("n", "max_rounds", "max_tokens", "concurrency", "retries"):
        if getattr(a, flag) < (0 if flag == "n" else 1):
            p.error(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'n' else 1}")
    run = Path(a.run or f"runs/{a.dataset}")
    prep, noun = load_data(a.dataset, a.data_dir, run, a.noun)
    prep = with_titles(prep, a.titles)
    rows = select_rows(prep, a.select, n=a.n, seed=a.seed, scores=a.scores, rows_file=a.rows)
    if not len(rows):
        raise DataError(f"--select {a.select} chose no training rows")
    out = Path(a.out) if a.out else RunDir(run).traces
    if a.teacher == "facts":  # counts from the data, not a model (thinkrec/reasoning/facts.py)
        from .facts import NAME, synthesize_facts

        print(f"{len(rows)} training samples ({a.select}) -> {out}, teacher {NAME}", file=sys.stderr, flush=True)
        summary = synthesize_facts(prep, rows, out, noun=noun, history=a.history,
                                   log=lambda *m: print(*m, file=sys.stderr, flush=True))
        print(to_json(summary), flush=True)
        return summary
    from .teacher import make_teacher

    teacher = make_teacher(a.teacher, a.model, timeout=a.timeout, retries=a.retries, temperature=a.temperature,
                           seed=a.seed)
    kw_path = RunDir(run).keywords
    keywords = load_keywords(kw_path, prep.items) if kw_path.exists() else None
    print(f"{len(rows)} training samples ({a.select}) -> {out}, teacher {teacher.name}", file=sys.stderr, flush=True)
    summary = synthesize(prep, rows, teacher, out, keywords=keywords, noun=noun, history=a.history,
                         concurrency=a.concurrency,
                         max_rounds=a.max_rounds, max_tokens=a.max_tokens, progress=not a.no_progress,
                         log=lambda *m: print(*m, file=sys.stderr, flush=True))
    print(to_json(summary), flush=True)
    return summary


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("synth", "keywords"):
        print(__doc__, file=sys.stderr)
        print("usage: python -m thinkrec.reasoning {synth,keywords} ...", file=sys.stderr)
        return 2
    from thinkrec.errors import USER_ERRORS, report

    try:
        if argv[0] == "synth":
            synth_main(argv[1:])
        else:
            from .keywords import keywords_main

            keywords_main(argv[1:])
    except USER_ERRORS as e:
        return report(f"python -m thinkrec.reasoning {argv[0]}", e)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
