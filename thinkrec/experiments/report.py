"""A study's results as RESULTS/<study>.md (markdown tables beside the paper's rows), RESULTS/<study>.json
and PNG plots (matplotlib, Agg backend, FIG_PX pixels each, written atomically):

    table2    table2.png: every method's four metrics on the test split, grouped bars
    ablation  ablation_<metric>.png: one bar chart per metric (ours on each population, the paper's)
    experts   experts_<metric>.png: the metric against N, one line per population
    grouping  grouping_<metric>.png: the metric against the grouping's Cohen's d (embedding), one point per
              CF model (log axis when the d's differ 5x)
The test split's AUC and UAUC carry their 95% bootstrap intervals (the study's "uncertainty") as error bars.

A study's result (what `write` takes) is {"study", "scale", "runs", "rows": [row]}, a row being {"label",
"run", "test", "test_rows", "official", "official_rows", "paper"} (metric dicts, or None where there is
none) plus the study's own columns (LEAD).
"""

import math
from pathlib import Path

import numpy as np

from thinkrec.io import atomic_file, atomic_write_text, write_json

from .plan import METRIC_NAMES, METRICS

FIG_PX, DPI = (640, 400), 100  # every PNG is FIG_PX[0] x FIG_PX[1] pixels
POPULATIONS = {"test": "test split", "official": "official 25% test sample"}
# a study's columns before the metrics: (header, row key)
LEAD = {
    "table2": [("method", "label")],
    "ablation": [("setting", "label")],
    "experts": [("experts N", "label")],
    "grouping": [("CF model", "label"), ("Cohen's d (embedding)", "cohens_d"),
                 ("Cohen's d (like rate)", "cohens_d_like_rate"), ("group sizes", "group_sizes")],
}
TITLES = {
    "table2": "Table 2: CF baselines, TALLRec-style, CoLLM-style and ThinkRec",
    "ablation": "Ablation (the paper's Table 4)",
    "experts": "Number of experts (the paper's Figure 3)",
    "grouping": "Grouping features (the paper's Figure 4)",
}
NOTES = {
    "table2": "CF rows: the model selected by a grid search on valid AUC (thinkrec.cf.search, bench/baselines.py's "
              "way), scored on every row. LLM rows: train.py --last-stage stage1 (TALLRec-style, no ids, no "
              "traces), stage2 (CoLLM-style, no traces) and stage3 (ThinkRec: traces and 2 experts on MF), "
              "scored on the test rows their run draws; the MF row and the like-rate floor (each user's and each item's "
              "smoothed train-split like rate, no model: thinkrec.cf.likerate) on those same rows are beside them.",
    "ablation": "full = ThinkRec; w/o think = no reasoning traces in any stage; w/o experts = stages 1-2 with "
                "traces, every user on the global adapter; w/o both = CoLLM-style. The paper's Table 4 has no "
                "AUC column (its \"full\" AUC is Table 2's).",
    "experts": "ThinkRec with N expert groups on MF embeddings; stages 1-2 are shared, N changes the groups and "
               "stage 3. The paper's Figure 3 shows Book and Yelp only: no ML-1M numbers to compare with.",
    "grouping": "ThinkRec with 2 groups from each CF model's user embeddings (that model also gives the ids); "
                "Cohen's d from RUN/experts/report.json. The paper's Figure 4 has no ML-1M numbers.",
}


def fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, list):
        return "/".join(map(str, v))
    return str(v)


def populations(rows) -> list:
    """The populations some row has numbers for (the official sample only on data that has one)."""
    return [p for p in POPULATIONS if any(r.get(p) for r in rows)]


def table(rows, population: str, lead, paper: bool) -> str:
    head = [h for h, _ in lead] + ["rows"] + [METRIC_NAMES[m] for m in METRICS]
    head += [f"paper {METRIC_NAMES[m]}" for m in METRICS] if paper else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m, p = r.get(population) or {}, r.get("paper") or {}
        cells = [fmt(r.get(k)) for _, k in lead] + [fmt(r.get(f"{population}_rows"))]
        cells += [fmt(m.get(k)) for k in METRICS] + ([fmt(p.get(k)) for k in METRICS] if paper else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict, plots: list) -> str:
    study, rows = result["study"], result["rows"]
    paper = any(r.get("paper") for r in rows)
    out = [f"# {TITLES[study]}", "",
           f"Scale `{result['scale']}`, runs in `{shown(result['runs'])}`. {NOTES[study]}"]
    out.append("rows: the test rows each line's metrics are over (an LLM run scores the draw of its "
               "--max-test-samples; 0 = every row); – where there is no number (an AUC over one label).")
    precision = precisions(rows)
    if precision:
        out.append(f"Precision of the LLM runs (what train.py's --precision resolved to): {precision}.")
    if paper:
        out.append("Paper columns: ThinkRec paper, ML-1M (Llama3-8B, the official evaluation).")
    for pop in populations(rows):
        out += ["", f"## {POPULATIONS[pop][0].upper() + POPULATIONS[pop][1:]}", "",
                table(rows, pop, LEAD[study], paper)]
        if pop == "test" and result.get("uncertainty"):
            out += ["", intervals(result["uncertainty"])]
    out += ["", *(f"![{p.stem}]({p.name})" for p in plots)]
    return "\n".join(out) + "\n"


def precisions(rows) -> str:
    """"bf16" when every LLM run used it, else each row's ("ThinkRec fp32, w/o think bf16"); "" if unknown."""
    runs = [(r["label"], r["precision"]) for r in rows if r.get("precision")]
    if len({p for _, p in runs}) <= 1:
        return runs[0][1] if runs else ""
    return ", ".join(f"{label} {p}" for label, p in runs)


def intervals(u: dict) -> str:
    """The bootstrap table: each LLM row's 95% interval and its paired difference from the reference row."""
    def span(a):
        return f"{fmt(a[0], 3)} – {fmt(a[1], 3)}"

    def signed(x, a):
        return f"{x:+.3f} ({a[0]:+.3f} – {a[1]:+.3f})"

    lines = [(f"95% intervals on these {u['rows']} rows: bootstrap over their {u['users']} users ({u['resamples']} "
              f"resamples), paired, so each difference from `{u['reference']}` has its own interval; P = the "
              f"share of resamples where the row beats `{u['reference']}`."), "",
             "| row | AUC interval | UAUC interval | AUC − ref (interval) | P | UAUC − ref (interval) | P |", "|---|---|---|---|---|---|---|"]
    ref = u["by_label"][u["reference"]]
    for label, v in u["by_label"].items():
        d = v["vs_reference"]
        diff = ["(reference)", "", "", ""] if d is None else [
            signed(v["auc"] - ref["auc"], d["auc"]), fmt(d["p_greater"]["auc"], 2),
            signed(v["uauc"] - ref["uauc"], d["uauc"]), fmt(d["p_greater"]["uauc"], 2)]
        lines.append("| " + " | ".join([label, span(v["interval"]["auc"]), span(v["interval"]["uauc"]), *diff]) + " |")
    return "\n".join(lines)


def shown(path: str) -> str:
    """`path` relative to the working directory when it lies under it (pages that are committed), else as is."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


# ------------------------------------------------------------------------------------------------ plots
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(FIG_PX[0] / DPI, FIG_PX[1] / DPI), dpi=DPI)
    return plt, fig, ax


def _save(plt, fig, ax, path, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, never on them
    fig.tight_layout()  # moves the axes inside the figure; the figure keeps its FIG_PX size
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=DPI)
    plt.close(fig)


def _values(vals) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in vals], dtype=float)


def _yerr(vals, spans) -> np.ndarray | None:
    """matplotlib's yerr [2, n] (distance below, above) from [lo, hi] per value (None: no bar there)."""
    if spans is None:
        return None
    y = _values(vals)
    lo = np.array([np.nan if s is None else s[0] for s in spans], dtype=float)
    hi = np.array([np.nan if s is None else s[1] for s in spans], dtype=float)
    return np.nan_to_num(np.stack([y - lo, hi - y]), nan=0.0).clip(min=0.0)


def bars(path, categories, series: dict, title: str, xlabel: str, ylabel: str, spans: dict | None = None) -> None:
    """Grouped bars: one group per category, one bar per series ({name: [value per category]}), with a 95%
    interval where spans ({name: [[lo, hi] or None per category]}) has one. The y axis starts near the
    smallest value, not at 0: the settings differ by hundredths."""
    plt, fig, ax = _figure()
    spans = spans or {}
    x, width = np.arange(len(categories)), 0.8 / max(len(series), 1)
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, _values(vals), width, label=name,
               yerr=_yerr(vals, spans.get(name)), capsize=3)
    ax.set_xticks(x, [str(c) for c in categories])
    finite = np.concatenate([_values(v) for v in series.values()] or [np.zeros(0)])
    finite = finite[np.isfinite(finite)]
    if len(finite):
        low, high = finite.min(), finite.max()
        ax.set_ylim(max(0.0, low - 0.1 * (high - low) - 0.02), high + 0.15 * (high - low) + 0.02)
    _save(plt, fig, ax, path, title, xlabel, ylabel)


def lines(path, x, series: dict, title: str, xlabel: str, ylabel: str, spans: dict | None = None) -> None:
    plt, fig, ax = _figure()
    spans = spans or {}
    for name, vals in series.items():
        ax.errorbar(x, _values(vals), yerr=_yerr(vals, spans.get(name)), marker="o", capsize=3, label=name)
    ax.set_xticks(x)
    _save(plt, fig, ax, path, title, xlabel, ylabel)


def scatter(path, x, series: dict, point_labels, title: str, xlabel: str, ylabel: str,
            spans: dict | None = None) -> None:
    plt, fig, ax = _figure()
    spans, x = spans or {}, _values(x)
    finite = x[np.isfinite(x)]
    if len(finite) and finite.min() > 0 and finite.max() > 5 * finite.min():
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")  # Cohen's d of 3 and of 30 on one axis, ticks as plain numbers
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    top = np.full(len(x), np.nan)  # per x, the highest point or error bar drawn there
    for name, vals in series.items():
        y, err = _values(vals), _yerr(vals, spans.get(name))
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=name)
        top = np.fmax(top, y if err is None else y + err[1])
    for xi, ti, text in zip(x, top, point_labels):  # one upright label per x, above everything drawn there,
        if np.isfinite(xi) and np.isfinite(ti):      # so that close x's (d 3.4 and 4.0) do not collide
            ax.annotate(text, (xi, ti), textcoords="offset points", xytext=(0, 4), rotation=90, ha="center",
                        va="bottom", fontsize="small")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.3 * (high - low))  # room for the labels
    _save(plt, fig, ax, path, title, xlabel, ylabel)


def plot(result: dict, out_dir) -> list:
    """The study's PNGs in out_dir; returns their paths."""
    study, rows = result["study"], result["rows"]
    labels = [r["label"] for r in rows]

    def series(metric, with_paper=False):
        """{legend name: [value per row]}, series without any value left out."""
        s = {POPULATIONS[p]: [(r.get(p) or {}).get(metric) for r in rows] for p in POPULATIONS}
        if with_paper:
            s["paper"] = [(r.get("paper") or {}).get(metric) for r in rows]
        return {k: v for k, v in s.items() if np.isfinite(_values(v)).any()}

    def spans(metric):
        """The test series' 95% bootstrap intervals (AUC and UAUC), per row; {} when there are none."""
        u = result.get("uncertainty")
        if not u or metric not in ("auc", "uauc"):
            return {}
        by = u["by_label"]
        return {POPULATIONS["test"]: [by[str(r["label"])]["interval"][metric] if str(r["label"]) in by else None
                                      for r in rows]}

    if study == "table2":
        path = out_dir / "table2.png"
        bars(path, [METRIC_NAMES[m] for m in METRICS],
             {r["label"]: [(r.get("test") or {}).get(m) for m in METRICS] for r in rows},
             "Table 2, test split (rows: see table2.md)", "metric", "value")
        return [path]
    paths = []
    for m in METRICS:
        path = out_dir / f"{study}_{m.replace('@', '')}.png"
        name = METRIC_NAMES[m]
        if study == "ablation":
            bars(path, labels, series(m, with_paper=True), f"Ablation: {name}", "setting", name, spans(m))
        elif study == "experts":
            lines(path, labels, series(m), f"{name} against the number of experts", "experts N", name, spans(m))
        else:
            scatter(path, [r.get("cohens_d") for r in rows], series(m), labels,
                    f"{name} against the grouping's Cohen's d", "Cohen's d of the groups (embedding)", name,
                    spans(m))
        paths.append(path)
    return paths


def write(result: dict, out_dir) -> list:
    """RESULTS/<study>.json, its PNGs and RESULTS/<study>.md (last); returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study = result["study"]
    write_json(out_dir / f"{study}.json", result)
    plots = plot(result, out_dir)
    atomic_write_text(out_dir / f"{study}.md", markdown(result, plots))
    return [out_dir / f"{study}.json", *plots, out_dir / f"{study}.md"]
