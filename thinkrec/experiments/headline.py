"""The headline: CoLLM-style and ThinkRec against MF and the like-rate floor on every row of the official
25% test sample, as seed means with paired bootstrap intervals over users.

    python -m thinkrec.experiments headline --seeds 0,1,2                   # the scale's budget, 3 seeds
    python -m thinkrec.experiments.headline "CoLLM-style@0=runs/x" "ThinkRec@0=runs/y/scores.jsonl" --results DIR
                                                      # the same table from runs (or score files) made by hand

Each seed is its own set of runs (seed 0 in RUNS/<scale>/, seed k in RUNS/<scale>-seed<k>/: data, CF model,
traces and the two LLM runs, train.py --seed k), every run scoring the official sample whole (train.py
--test-rows official --max-test-samples 0). MF is each seed's CF model on the same rows, the like-rate floor
the train split's counts (the same for every seed). Writes RESULTS/headline.{json,md,png} and each run's
scored rows, trimmed to what a headline reads, as RESULTS/headline_scores/<method>-seed<k>.jsonl: a seed whose
files are there is read from them, not trained again (per method: a seed with CoLLM-style saved trains
ThinkRec alone), so seeds can be run on different days or machines (`--seeds 1`, later `--seeds 2`) and the
table always covers every method and seed scored into RESULTS:

    {"population", "rows", "scale", "seeds", "methods": {name: {"auc", "uauc"[, "per_seed"]}},
     "intervals": {name: {"auc": [lo, hi], "uauc": [lo, hi], "vs": {"MF" | "like-rate": {"auc", "uauc",
     "p_greater"}}}}, "resamples", "users"}

auc / uauc of a seeded row are the means over seeds; its interval and its differences from MF and the floor
come from one bootstrap over users in which every resample averages the seeds (thinkrec.metrics.bootstrap's
`averages`). Nothing here picks anything: settings are chosen on valid rows before the test is scored.
"""

import argparse
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from thinkrec.io import ArtifactError, atomic_write_text, read_json, read_jsonl, write_json, write_jsonl
from thinkrec.metrics import bootstrap, evaluate

from . import report
from .plan import SETTINGS
from .runs import Config, ExperimentError, cf_model, run_setting, shared_data, shared_traces

HEADLINE = [("CoLLM-style", "collm"), ("ThinkRec", "thinkrec")]
FLOORS = ("MF", "like-rate")
POPULATION = "official 25% test sample"


def seed_config(cfg: Config, seed: int) -> Config:
    """The runs of one seed: RUNS/<scale> for seed 0, RUNS/<scale>-seed<k> for the others; every test row of
    the official sample scored."""
    runs = cfg.runs if seed == 0 else cfg.runs.with_name(f"{cfg.runs.name}-seed{seed}")
    return replace(cfg, seed=seed, runs=runs,
                   overrides={**cfg.overrides, "test_rows": "official", "max_test_samples": 0})


SCORES = "headline_scores"  # RESULTS/SCORES/<method>-seed<k>.jsonl: the rows of every seed scored so far


def saved_scores(results: Path, label: str, seed: int) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    return Path(results) / SCORES / f"{slug}-seed{seed}.jsonl"


def _saved(results: Path, scale: str) -> set:
    """{(label, seed)} of the headline methods whose scored rows are saved in RESULTS (at `scale`: another
    scale's are an error)."""
    seeds = {int(m.group(1)) for f in (Path(results) / SCORES).glob("*.jsonl")
             if (m := re.search(r"-seed(\d+)\.jsonl$", f.name))}
    have = {(label, seed) for label, _ in HEADLINE for seed in seeds if saved_scores(results, label, seed).is_file()}
    summary = Path(results) / "headline.json"
    if have and summary.is_file():
        were = read_json(summary, f"delete {summary.parent / SCORES}/ to score every seed again").get("scale")
        if were != scale:
            raise ExperimentError(f"{summary.parent / SCORES} holds scores of scale {were}, not {scale}: give "
                                  f"another --results directory (or delete that one to start over)")
    return have


def run(cfg: Config, seeds, results: Path, log) -> dict:
    """Train and score what is missing of every seed asked, then write RESULTS/headline.* over those seeds and
    every method and seed saved in RESULTS before; returns the summary."""
    scored = {}
    saved = _saved(results, cfg.scale)
    for seed in sorted(set(seeds) | {s for _, s in saved}):
        todo = [(label, name) for label, name in HEADLINE if (label, seed) not in saved]
        scored.update({(label, seed): saved_scores(results, label, seed) for label, _ in HEADLINE
                       if (label, seed) in saved})
        if len(todo) < len(HEADLINE):
            log(f"headline, seed {seed}: {', '.join(l for l, _ in HEADLINE if (l, seed) in saved)} scored before, "
                f"read from {results / SCORES}")
        if not todo or seed not in seeds:
            continue
        c = seed_config(cfg, seed)
        log(f"headline, seed {seed}: runs in {c.runs}")
        prep = shared_data(c, log)
        cf_model(c, prep, "mf", log)
        if any(SETTINGS[name].traces for _, name in todo):
            shared_traces(c, log)
        for label, name in todo:
            run_setting(c, SETTINGS[name], log)
            scored[(label, seed)] = c.runs / name
    scored = {k: scored[k] for k in sorted(scored, key=lambda k: ([l for l, _ in HEADLINE].index(k[0]), k[1]))}
    out = summarize(scored, cfg.scale, sorted({seed for _, seed in scored}))
    paths = write(out, results, scored)
    log(f"headline: wrote {', '.join(str(p) for p in paths)}")
    return out


SCORE_KEYS = ("row", "user_id", "label", "score", "mf_score", "like_rate_score")  # what a headline reads of a row


def _scores(run: Path) -> list:
    """The scored rows of a run directory (RUN/infer/scores.jsonl) or of a scores.jsonl file."""
    path = Path(run)
    if path.is_dir():
        path, redo = path / "infer" / "scores.jsonl", f"delete {path}/metrics.json to test the run again"
    else:
        redo = "score the rows again (python infer.py ... --out DIR)"
    rows = read_jsonl(path, redo)
    for n, x in enumerate(rows, 1):
        if not (isinstance(x, dict) and all(k in x for k in SCORE_KEYS) and x["label"] in (0, 1)
                and all(isinstance(x[k], (int, float)) and not isinstance(x[k], bool)
                        for k in ("score", "mf_score", "like_rate_score"))):
            raise ArtifactError(f"{path}: line {n} is not a score line of infer.py (with {', '.join(SCORE_KEYS)}); "
                                f"{redo}")
    return rows


def summarize(scored: dict, scale: str, seeds: list) -> dict:
    """The headline summary of {(label, seed): run directory}, each run's infer/scores.jsonl over the same
    official-sample rows."""
    recs = {key: _scores(run) for key, run in scored.items()}
    first = next(iter(recs.values()))
    rows = [x["row"] for x in first]
    for (label, seed), r in recs.items():
        if [x["row"] for x in r] != rows:
            raise ExperimentError(f"{scored[(label, seed)]} scored other test rows than "
                                  f"{scored[next(iter(recs))]}: the headline needs every run on the same rows")
    users, labels = [x["user_id"] for x in first], [x["label"] for x in first]
    sets, averages = {"like-rate": [x["like_rate_score"] for x in first]}, {}
    for (label, seed), r in recs.items():
        sets[f"{label}@{seed}"] = [x["score"] for x in r]
        averages.setdefault(label, []).append(f"{label}@{seed}")
        if f"MF@{seed}" not in sets:  # each seed's CF model, read from the first of its runs
            sets[f"MF@{seed}"] = [x["mf_score"] for x in r]
            averages.setdefault("MF", []).append(f"MF@{seed}")
    point = {k: evaluate(users, v, labels) for k, v in sets.items()}
    methods = {"like-rate": {m: point["like-rate"][m] for m in ("auc", "uauc")}}
    for name, members in averages.items():
        methods[name] = {m: float(np.mean([point[k][m] for k in members])) for m in ("auc", "uauc")}
        methods[name]["per_seed"] = [{"seed": int(k.split("@")[1]), **{m: point[k][m] for m in ("auc", "uauc")}}
                                     for k in members]
    b = bootstrap(users, sets, labels, averages=averages)
    llm = [name for name in averages if name != "MF"]  # the LLM rows, in the order given
    intervals = {}
    for label in llm:
        intervals[label] = {**b["intervals"][label],
                            "vs": {floor: b["differences"][label][floor] for floor in FLOORS}}
    for floor in FLOORS:
        intervals[floor] = b["intervals"][floor]
    return {"population": POPULATION, "rows": len(rows), "scale": scale, "seeds": seeds,
            "methods": {k: methods[k] for k in (*FLOORS, *llm)},
            "intervals": intervals, "resamples": b["n"], "users": b["users"]}


def markdown(out: dict) -> str:
    lines = [f"## Headline: the {out['population']}, {out['rows']} rows, scale {out['scale']}, seeds "
             f"{', '.join(map(str, out['seeds']))}", "",
             "| method | AUC | UAUC | AUC 95% | UAUC 95% | AUC - MF | UAUC - MF | AUC - like-rate | UAUC - like-rate |",
             "|---|---|---|---|---|---|---|---|---|"]
    span = lambda s: f"[{s[0]:.4f}, {s[1]:.4f}]"  # noqa: E731
    for name, m in out["methods"].items():
        iv = out["intervals"][name]
        vs = iv.get("vs", {})
        diffs = [span(vs[f][k]) if f in vs else "" for f in FLOORS for k in ("auc", "uauc")]
        lines.append(f"| {name} | {m['auc']:.4f} | {m['uauc']:.4f} | {span(iv['auc'])} | {span(iv['uauc'])} | "
                     + " | ".join(diffs) + " |")
    lines += ["", f"Seeded rows are seed means; intervals: {out['resamples']} paired bootstrap resamples over "
              f"{out['users']} users, each averaging the seeds. MF: each seed's CF model on the same rows; "
              f"like-rate: smoothed user and item like rates of the train split (no model). The LLM rows are "
              f"the LLM alone, no fusion with MF. Each run's scored rows: {SCORES}/."]
    return "\n".join(lines) + "\n"


def write(out: dict, results: Path, scored: dict | None = None) -> list:
    """RESULTS/headline.{json,md,png}, and with `scored` ({(label, seed): run or score file}) each one's rows
    as RESULTS/headline_scores/<label>-seed<seed>.jsonl (the keys a headline reads)."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    for (label, seed), run in (scored or {}).items():
        dest = saved_scores(results, label, seed)
        if Path(run).resolve() != dest.resolve():
            dest.parent.mkdir(exist_ok=True)
            write_jsonl(dest, [{k: x[k] for k in SCORE_KEYS} for x in _scores(run)])
    names = list(out["methods"])
    report.bars(results / "headline.png", ["AUC", "UAUC"],
                {n: [out["methods"][n]["auc"], out["methods"][n]["uauc"]] for n in names},
                f"{out['population']} ({out['rows']} rows), seed means", "metric", "value",
                spans={n: [out["intervals"][n]["auc"], out["intervals"][n]["uauc"]] for n in names})
    write_json(results / "headline.json", out)
    atomic_write_text(results / "headline.md", markdown(out))
    return [results / "headline.json", results / "headline.md", results / "headline.png",
            *sorted({saved_scores(results, label, seed) for label, seed in (scored or {})})]


def main(argv=None) -> dict:
    """The headline files from runs or score files made by hand (the same rows each): LABEL@SEED=PATH."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("scored", nargs="+", help="LABEL@SEED=PATH: a run directory (RUN/infer/scores.jsonl) or a "
                                             "scores.jsonl file; the first label's rows give MF")
    p.add_argument("--results", required=True, type=Path, help="where headline.{json,md,png} go")
    p.add_argument("--scale", default="custom", help="what the runs' budget was, as the page should say")
    a = p.parse_args(argv)
    scored = {}
    for spec in a.scored:
        key, eq, path = spec.partition("=")
        label, at, seed = key.rpartition("@")
        if not (eq and at and label and seed.isdigit()):
            p.error(f"{spec!r}: expected LABEL@SEED=PATH, e.g. CoLLM-style@0=runs/collm")
        scored[(label, int(seed))] = Path(path)
    out = summarize(scored, a.scale, sorted({s for _, s in scored}))
    for path in write(out, a.results, scored):
        print(path)
    print(markdown(out))
    return out


if __name__ == "__main__":
    from thinkrec.errors import run_cli

    run_cli("python -m thinkrec.experiments.headline", main)
