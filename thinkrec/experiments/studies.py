"""Run studies: the shared phases, each setting's train.py run once, then every study's rows and outputs.

    results = run(cfg, ["ablation", "experts"], Path("results"), Log())

Rows come from each run's metrics.json ("test": the rows its run scored; "test_official_sample": those of
them in the official 25% sample) and, for Table 2's CF baselines, from shared/cf/<kind>.json (every test
row, and the whole official sample).
"""

from pathlib import Path

from thinkrec.io import read_json, read_jsonl
from thinkrec.metrics import bootstrap
from thinkrec.precision import stored
from thinkrec.rundir import config_of

from . import report
from .plan import CF_MODELS, CF_NAMES, METRICS, PAPER, STUDIES, cf_models_of, settings_of
from .runs import Config, cf_model, run_setting, shared_data, shared_traces


def run(cfg: Config, studies, results: Path, log) -> dict:
    """{study: result} (report.write's input), each study's files written to `results`."""
    settings = settings_of(studies)
    kinds = cf_models_of(studies)
    log(f"plan: {', '.join(studies)} at scale {cfg.scale}: CF models {', '.join(kinds)}; {len(settings)} train.py "
        f"runs ({', '.join(s.name for s in settings)}) in {cfg.runs}")
    prep = shared_data(cfg, log)
    cf = {k: cf_model(cfg, prep, k, log) for k in kinds}
    if any(s.traces for s in settings):
        shared_traces(cfg, log)
    metrics = {s.name: run_setting(cfg, s, log) for s in settings}
    out = {}
    for study in studies:
        out[study] = collect(cfg, study, metrics, cf)
        paths = report.write(out[study], results)
        log(f"{study}: wrote {', '.join(str(p) for p in paths)}")
    return out


def collect(cfg: Config, study: str, metrics: dict, cf: dict) -> dict:
    rows = [cf_row(CF_NAMES[k], cf[k], str(cfg.shared / "cf" / f"{k}.json")) for k in CF_MODELS] \
        if study == "table2" else []
    for label, name in STUDIES[study]:
        run, m = cfg.runs / name, metrics[name]
        paper = PAPER.get(study, {}).get(label)
        precision = (stored(run) or {"name": "fp32"})["name"]  # no RUN/precision.json: a run from before, fp32
        row = {"label": label, "setting": name, "run": str(run), "precision": precision,
               **llm_populations(m, "thinkrec"),
               "paper": None if paper is None else dict(zip(METRICS, paper)), "routing": m["routing"],
               "seconds": m["seconds"], "stages": {st: {k: v.get(k) for k in ("steps", "best_step", "seconds")}
                                                   for st, v in m["stages"].items()}}
        if study == "grouping":
            rep = read_json(run / "experts" / "report.json", f"delete {run}/ to rerun it")
            row.update(cohens_d=rep.get("cohens_d_embedding"), cohens_d_like_rate=rep.get("cohens_d_like_rate"),
                       group_sizes=rep.get("group_sizes"))
        rows.append(row)
    if study == "table2":  # the CF model and the like-rate floor on exactly the rows the LLM runs scored
        rows.append({"label": "MF on the LLM rows", "setting": "thinkrec", "run": str(cfg.runs / "thinkrec"),
                     **llm_populations(metrics["thinkrec"], "cf"), "paper": None})
        if metrics["thinkrec"].get("test_like_rate"):  # runs from before the floor existed have none
            rows.append({"label": FLOOR, "setting": "thinkrec", "run": str(cfg.runs / "thinkrec"),
                         **llm_populations(metrics["thinkrec"], "like_rate"), "paper": None})
    return {"study": study, "scale": cfg.scale, "runs": str(cfg.runs),
            "train_flags": config_of({**cfg.budget.train, **cfg.overrides}), "rows": rows,
            "uncertainty": uncertainty(study, rows)}


FLOOR = "like-rate on the LLM rows"  # thinkrec.cf.likerate: smoothed user and item like rates, no model
REFERENCE = {"table2": "ThinkRec", "ablation": "full", "experts": 2, "grouping": "mf"}  # differences are against it


def uncertainty(study: str, rows: list) -> dict | None:
    """Paired bootstrap over users (metrics.bootstrap) of the study's LLM rows on the test rows they scored,
    from each run's infer/scores.jsonl: a 95% interval per row, and each row's difference from the study's
    reference row. None when the runs scored different rows (then they cannot be paired)."""
    scored, points = {}, {}  # label -> the run's scored rows; label -> its test metrics
    for r in rows:
        if r.get("setting") is None:
            continue  # a CF baseline over every row: its interval is not the question here
        recs = read_jsonl(Path(r["run"]) / "infer" / "scores.jsonl", f"delete {r['run']}/metrics.json to test the run again")
        scored[r["label"]] = recs
        points[r["label"]] = r["test"]
    if not scored or len({tuple(x["row"] for x in recs) for recs in scored.values()}) != 1:
        return None
    first = next(iter(scored.values()))
    key = lambda label: {"MF on the LLM rows": "mf_score", FLOOR: "like_rate_score"}.get(label, "score")
    b = bootstrap([x["user_id"] for x in first], {k: [x[key(k)] for x in recs] for k, recs in scored.items()},
                  [x["label"] for x in first])
    ref = REFERENCE[study]
    return {"reference": str(ref), "resamples": b["n"], "users": b["users"], "rows": len(first),
            "by_label": {str(k): {"auc": points[k]["auc"], "uauc": points[k]["uauc"], "interval": b["intervals"][k],
                                  "vs_reference": None if k == ref else b["differences"][k][ref]}
                         for k in scored}}


def pick(m: dict | None) -> dict | None:
    return None if m is None else {k: m.get(k) for k in (*METRICS, "n_users")}


def llm_populations(m: dict, who: str) -> dict:
    """A run's metrics of `who` ("thinkrec"; "cf" for its CF model, "like_rate" for the floor, on the same rows)
    per population."""
    off = m.get("test_official_sample") or {}
    return {"test": pick(m["test"] if who == "thinkrec" else m[f"test_{who}"]), "test_rows": m["test_rows"],
            "official": pick(off.get(who)) if off.get("rows") else None, "official_rows": off.get("rows")}


def cf_row(label: str, info: dict, where: str) -> dict:
    off = info.get("test_official_sample")
    return {"label": label, "setting": None, "run": where, "test": pick(info["test"]),
            "test_rows": info["test"]["n_rows"], "official": pick(off), "official_rows": off and off["n_rows"],
            "paper": dict(zip(METRICS, PAPER["table2"][label]))}
