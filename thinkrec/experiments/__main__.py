"""python -m thinkrec.experiments {table2,ablation,experts,grouping,all,headline} [flags]

    python -m thinkrec.experiments all                          # cpu-small on the shared ML-1M split
    python -m thinkrec.experiments ablation --scale paper --teacher http://localhost:8000/v1 \\
        --teacher-model Qwen/QwQ-32B                            # the paper's setting, on a GPU
    python -m thinkrec.experiments all --traces runs/ml1m/reasoning/traces.jsonl   # traces made elsewhere
    python -m thinkrec.experiments table2 --max-test-samples 0  # the scale's budget, every test row scored
    python -m thinkrec.experiments headline --seeds 0,1,2       # CoLLM-style and ThinkRec vs MF and like-rate
                                                                # on the official test sample (headline.py)

Writes RESULTS/<study>.md (tables beside the paper's rows), RESULTS/<study>.json and PNG plots. The runs go
to RUNS/<scale>/ and are kept: a rerun computes only what is missing, so a killed `all` resumes.
"""

import argparse
import os
from pathlib import Path

from thinkrec.errors import number

from .plan import SCALES, STUDIES
from .runs import ROOT, Config, ExperimentError, Log

ML1M = ROOT.parent / "shared" / "data" / "ml1m-collm"  # the paper's ML-1M split (bench/_util.py's ML1M)
OVERRIDES = ("max_train_samples", "max_eval_samples", "max_test_samples", "epochs", "lr", "precision")


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m thinkrec.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=[*STUDIES, "all", "headline"])
    # Where
    p.add_argument("--results", default="results", help="tables, JSON and plots go here")
    p.add_argument("--runs", default="runs/experiments", help="run directories, kept, under RUNS/<scale>/")
    # Data and models (passed through to train.py and the trace synthesis)
    p.add_argument("--dataset", default="csv", help="train.py --dataset")
    p.add_argument("--data-dir", dest="data", default=str(ML1M) if ML1M.is_dir() else None,
                   help="train.py --data-dir (default: the shared ML-1M split, when present)")
    p.add_argument("--noun", default=None, help="train.py --noun (default: movie for the shared ML-1M split, else "
                   "the dataset's)")
    p.add_argument("--model", default=None, help="train.py --model (default: its SmolLM2-135M-Instruct)")
    p.add_argument("--teacher", default="local", help="synth --teacher: 'local' (the embedded SmolLM2, weak), "
                   "'local:MODEL' or an OpenAI-compatible URL")
    p.add_argument("--teacher-model", default=None, help="the model an HTTP teacher serves (synth --model)")
    p.add_argument("--traces", default=None, help="a traces JSON Lines file to train on instead of synthesising")
    # Budget
    p.add_argument("--scale", default="cpu-small", choices=list(SCALES),
                   help="cpu-small: `all` in about 3.5 hours on 2 CPU cores; cpu-medium: the CF-token levers and "
                        "2,048 stage-2 rows, about 2 hours a run (use it with `headline`); paper: the paper's "
                        "setting (a GPU); tiny: the tests' toy runs")
    p.add_argument("--max-train-samples", type=int, default=None, help="over the scale's (train.py; 0 = all)")
    p.add_argument("--max-eval-samples", type=int, default=None, help="over the scale's (train.py; 0 = all)")
    p.add_argument("--max-test-samples", type=int, default=None, help="over the scale's (train.py; 0 = all)")
    p.add_argument("--epochs", type=float, default=None, help="over the scale's (train.py)")
    p.add_argument("--lr", type=float, default=None, help="over the scale's (train.py)")
    p.add_argument("--precision", default=None, help="over the scale's (train.py: auto, fp32, bf16)")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--seeds", default="0,1,2", help="headline only: comma-separated seeds, one set of runs each")
    return p.parse_args(argv)


def _path_if_exists(text):
    """An absolute path where `text` names an existing file or directory (runs start elsewhere), else `text`."""
    return str(Path(text).resolve()) if text and Path(text).exists() else text


def config(a) -> Config:
    if a.traces and not Path(a.traces).is_file():
        raise ExperimentError(f"--traces {a.traces}: no such file")
    if a.dataset == "csv" and not a.data:
        raise ExperimentError("--dataset csv needs --data-dir DIR (interactions.csv, items.csv); the shared ML-1M "
                              f"split is not at {ML1M}")
    teacher = a.teacher
    if teacher.startswith("local:"):
        teacher = "local:" + _path_if_exists(teacher[len("local:"):])
    data = _path_if_exists(a.data)
    noun = a.noun or ("movie" if data and Path(data) == ML1M.resolve() else None)
    return Config(runs=Path(a.runs).resolve() / a.scale, scale=a.scale, dataset=a.dataset, data=data, noun=noun, model=_path_if_exists(a.model), teacher=teacher,
                  teacher_model=a.teacher_model, traces=Path(a.traces).resolve() if a.traces else None, seed=a.seed,
                  overrides={k: getattr(a, k) for k in OVERRIDES if getattr(a, k) is not None})


def main(argv=None, log=None) -> dict:
    from .studies import run

    a = parse(argv)
    if a.study == "headline":
        from .headline import run as run_headline

        try:
            seeds = [number(int, 0)(s) for s in a.seeds.split(",") if s.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            raise ExperimentError(f"--seeds {a.seeds!r}: comma-separated integers, e.g. 0,1,2") from None
        return run_headline(config(a), seeds, Path(a.results).resolve(), Log(log))
    studies = list(STUDIES) if a.study == "all" else [a.study]
    return run(config(a), studies, Path(a.results).resolve(), Log(log))


if __name__ == "__main__":
    from thinkrec.errors import run_cli

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli("python -m thinkrec.experiments", main)
