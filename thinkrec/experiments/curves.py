"""Learning curves: valid AUC and UAUC against the training rows each stage has seen, beside the floors.

    python -m thinkrec.experiments.curves runs/q/A runs/q/B --out docs/results --name levers

For each run directory: every valid evaluation of every finished stage (RUN/<stage>/train.json; train.py
--eval-every N adds points inside a stage), at x = optimizer steps x --batch-size x --accum, one line per
(run, stage); the run's CF model and like-rate floor on the same valid rows (metrics.json "valid_baselines")
as dashed horizontal lines. Writes OUT/<name>_auc.png, OUT/<name>_uauc.png and OUT/<name>.json.
"""

import argparse
import json
from pathlib import Path

from thinkrec.io import write_json
from thinkrec.rundir import RunDir
from thinkrec.stages import STAGES

from .report import _figure, _save



def curve_points(run: Path) -> dict:
    """{"label", "stages": {stage: [{"rows", "auc", "uauc"}]}, "floors": {"cf", "like_rate"} or {}} of a run."""
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    args = RunDir(run).config()  # typed; written when train.py starts, so a run still training has it
    rows_per_step = int(args.get("batch_size") or 8) * int(args.get("accum") or 1)
    stages = {}
    for st in STAGES:
        f = run / st / "train.json"
        if f.is_file():
            hist = json.loads(f.read_text())["history"]
            stages[st] = [{"rows": h["step"] * rows_per_step, "auc": h["auc"], "uauc": h["uauc"]} for h in hist]
    floors = metrics.get("valid_baselines") or {}
    return {"label": run.name, "stages": stages,
            "floors": {k: {m: v[m] for m in ("auc", "uauc")} for k, v in floors.items()}}


def plot_curves(runs, out_dir, name: str = "curve") -> list:
    """The two PNGs and the JSON of `runs` (directories) in out_dir; returns their paths."""
    curves = [curve_points(Path(r)) for r in runs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in ("auc", "uauc"):
        plt, fig, ax = _figure()
        for c in curves:
            for st, pts in c["stages"].items():
                ax.plot([p["rows"] for p in pts], [p[metric] for p in pts], marker="o", label=f"{c['label']} {st}")
        floors = next((c["floors"] for c in curves if c["floors"]), {})
        for key, style, label in (("cf", "--", "MF"), ("like_rate", ":", "like-rate")):
            if key in floors:
                ax.axhline(floors[key][metric], linestyle=style, color="black", label=f"{label} (same valid rows)")
        path = out / f"{name}_{metric}.png"
        _save(plt, fig, ax, path, f"valid {metric.upper()} against training rows per stage", "training rows",
              f"valid {metric.upper()}")
        paths.append(path)
    write_json(out / f"{name}.json", {"runs": [str(r) for r in runs], "curves": curves})
    return [*paths, out / f"{name}.json"]


def main(argv=None) -> list:
    p = argparse.ArgumentParser(prog="python -m thinkrec.experiments.curves", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="train.py run directories")
    p.add_argument("--out", default="results", help="where the PNGs and the JSON go")
    p.add_argument("--name", default="curve", help="file name stem")
    a = p.parse_args(argv)
    missing = [r for r in a.runs if not Path(r).is_dir()]
    if missing:
        p.error(f"no such run directory: {', '.join(missing)}")
    paths = plot_curves(a.runs, a.out, a.name)
    print("\n".join(str(x) for x in paths))
    return paths


if __name__ == "__main__":
    main()
