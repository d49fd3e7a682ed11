"""python -m thinkrec.experiments on the tiny random Llama and the tiny csv dataset of test_train_cli: `all`
runs once (module fixture: 10 train.py subprocesses, traces from a fake OpenAI-compatible teacher), writes
every table, JSON and PNG; a rerun launches nothing; the ablation settings switch off what they claim; the
experts study reuses stage 2 with resized adapters; changed settings stop with the directory named."""

import json
import re
import shutil

import numpy as np
import pytest

from tests.test_train_cli import _tiny_csv, _tiny_model_dir

pytest.importorskip("faiss")
pytest.importorskip("matplotlib")

from thinkrec.experiments import STUDIES, ExperimentError
from thinkrec.experiments.__main__ import main
from thinkrec.experiments.report import FIG_PX
from thinkrec.experiments.plan import SCALES

PLAIN = ("tallrec", "collm", "wo-think")  # the settings trained without traces
PNGS = ["table2.png"] + [f"{s}_{m}.png" for s in ("ablation", "experts", "grouping")
                         for m in ("auc", "uauc", "ndcg5", "map5")]


def _teacher(req, i):
    """Answers "Yes" first, then what the reflect turn states: every sample gets a trace within 2 rounds."""
    from tests.fake_openai import reply

    last = req["messages"][-1]["content"]
    word = "No" if "response is No" in last or "answer is No" in last else "Yes"
    return reply(f"{word}.", reasoning="the user liked comedies before")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    from tests.fake_openai import FakeOpenAI

    base = tmp_path_factory.mktemp("experiments")
    model = _tiny_model_dir(base / "model")
    data = base / "data"
    data.mkdir()
    _tiny_csv(data)
    lines = []
    with FakeOpenAI(_teacher) as srv, pytest.MonkeyPatch.context() as mp:
        mp.setenv("THINKREC_TEACHER_API_KEYS", "k1")
        argv = ["all", "--scale", "tiny", "--runs", str(base / "runs"), "--results", str(base / "results"),
                "--data-dir", str(data), "--model", str(model), "--teacher", srv.url, "--teacher-model", "fake"]
        main(argv, log=lines.append)
    return {"argv": argv, "lines": lines, "runs": base / "runs" / "tiny", "results": base / "results"}


def _metrics(done, name):
    return json.loads((done["runs"] / name / "metrics.json").read_text())


def test_all_writes_every_table_json_and_png(done):
    import matplotlib.image

    res = done["results"]
    for study in STUDIES:
        rows = json.loads((res / f"{study}.json").read_text())["rows"]
        md = (res / f"{study}.md").read_text()
        assert all(f"| {r['label']} |" in md for r in rows), study
    for name in PNGS:
        assert matplotlib.image.imread(res / name).shape[:2] == (FIG_PX[1], FIG_PX[0]), name
    table2 = json.loads((res / "table2.json").read_text())["rows"]
    assert [r["label"] for r in table2] == ["MF", "LightGCN", "SASRec", "TALLRec-style", "CoLLM-style", "ThinkRec",
                                            "MF on the LLM rows", "like-rate on the LLM rows"]
    m = _metrics(done, "thinkrec")
    assert table2[0]["test_rows"] == 20 and table2[-2]["test"]["auc"] == m["test_cf"]["auc"]
    assert table2[-1]["test"]["auc"] == m["test_like_rate"]["auc"] != m["test"]["auc"]
    assert "0.7764" in (res / "table2.md").read_text() and "0.6599" in (res / "ablation.md").read_text()
    # bootstrap intervals over the users of the rows every LLM run scored, paired against the reference row
    u = json.loads((res / "table2.json").read_text())["uncertainty"]
    assert u["reference"] == "ThinkRec" and u["rows"] == table2[3]["test_rows"]
    assert set(u["by_label"]) == {"TALLRec-style", "CoLLM-style", "ThinkRec", "MF on the LLM rows",
                                  "like-rate on the LLM rows"}
    for label, v in u["by_label"].items():
        lo, hi = v["interval"]["auc"]
        assert lo <= v["auc"] <= hi, label
        assert (v["vs_reference"] is None) == (label == "ThinkRec")
    assert "95% intervals on these" in (res / "table2.md").read_text()
    # each LLM row names what --precision resolved to in its run, and the page says it
    resolved = json.loads((done["runs"] / "thinkrec" / "precision.json").read_text())["name"]
    assert [r.get("precision") for r in table2] == [None] * 3 + [resolved] * 3 + [None] * 2
    assert f"--precision resolved to): {resolved}." in (res / "table2.md").read_text()
    assert json.loads((res / "ablation.json").read_text())["uncertainty"]["reference"] == "full"
    grouping = json.loads((res / "grouping.json").read_text())["rows"]
    assert [r["label"] for r in grouping] == ["mf", "lightgcn", "sasrec"]
    assert all(r["cohens_d"] is not None and len(r["group_sizes"]) == 2 for r in grouping)
    for n, name in ((1, "experts-1"), (2, "thinkrec"), (3, "experts-3"), (4, "experts-4")):
        assert len(json.loads((done["runs"] / name / "experts" / "report.json").read_text())["group_sizes"]) == n


def test_rerun_launches_nothing(done):
    stamps = {p: p.stat().st_mtime_ns for p in done["runs"].rglob("*") if p.is_file()}
    lines = []
    main(done["argv"], log=lines.append)
    assert not [line for line in lines if "starting" in line], lines
    assert sum("finished before, reused" in line for line in lines) == 10
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # the first run launched each setting once, and synthesis once
    assert sum("starting train.py" in line for line in done["lines"]) == 10
    assert sum("starting python -m thinkrec.reasoning synth" in line for line in done["lines"]) == 1


def _traces_drawn(log_text):
    return int(re.search(r"reasoning traces (\d+)", log_text).group(1))


def test_ablation_settings_switch_off_what_they_claim(done):
    runs = done["runs"]
    # w/o think (and the other plain settings): no traces read, no reasoning micro-batch drawn in any stage
    for name in PLAIN:
        assert _traces_drawn((runs / name / "train.log").read_text()) == 0
        assert not (runs / name / "reasoning").exists()
        for ckpt in (runs / name).glob("stage*/ckpt/ckpt.json"):
            assert json.loads(ckpt.read_text())["state"]["cursors"]["reason"] == [0, 0], ckpt
    assert _traces_drawn((runs / "thinkrec" / "train.log").read_text()) > 0
    assert any(json.loads(c.read_text())["state"]["cursors"]["reason"] != [0, 0]
               for c in (runs / "thinkrec").glob("stage*/ckpt/ckpt.json"))  # the think run does draw them
    # w/o think's stage 1 is the plain one (TALLRec-style's), never the one trained with traces
    plain, think = (runs / n / "stage1" / "adapters.safetensors" for n in ("tallrec", "thinkrec"))
    mine = (runs / "wo-think" / "stage1" / "adapters.safetensors").read_bytes()
    assert mine == plain.read_bytes() != think.read_bytes()
    # w/o experts: no stage 3, every test row on the global adapter
    m = _metrics(done, "wo-experts")
    assert not (runs / "wo-experts" / "stage3").exists() and set(m["stages"]) == {"stage1", "stage2"}
    assert m["routing"] == {"global": m["test_rows"]}
    assert set(_metrics(done, "thinkrec")["routing"]) - {"global"}  # the full run routes to experts


def test_experts_study_reuses_stage2_with_resized_adapters(done):
    from thinkrec.model.adapters import read_adapters

    runs = done["runs"]
    assert any(re.search(r"experts-4: starting .*stage2 reused from thinkrec", line) for line in done["lines"])
    cfg, mine = read_adapters(runs / "experts-4" / "stage2")
    _, donor = read_adapters(runs / "thinkrec" / "stage2")
    assert cfg["n_experts"] == 4 and cfg["adapters"][-1] == "expert_4"
    for key, t in donor.items():
        if ".global" in key or key.startswith("projector."):
            assert mine[key].equal(t), key
    assert all(mine[k].equal(mine[k.replace("expert_4", "global")]) for k in mine if k.endswith("expert_4"))


def test_changed_settings_stop_naming_the_directory(done, tmp_path):
    with pytest.raises(ExperimentError, match=r"tallrec was made with other settings: max_train_samples 12 "
                                              r"\(asked: 10\).*Delete"):
        main(done["argv"] + ["--max-train-samples", "10"], log=lambda line: None)
    other = tmp_path / "traces.jsonl"
    other.write_text("")
    with pytest.raises(ExperimentError, match=r"reasoning was made with other settings"):
        main(done["argv"] + ["--traces", str(other)], log=lambda line: None)


def test_runner_needs_a_source_checkout(monkeypatch, tmp_path):
    from thinkrec.experiments import runs

    monkeypatch.setattr(runs, "TRAIN", tmp_path / "train.py")
    with pytest.raises(ExperimentError, match="source checkout"):
        runs.train_script()


def test_page_names_each_rows_precision_when_runs_differ():
    from thinkrec.experiments.report import precisions

    assert precisions([{"label": "MF"}, {"label": "a", "precision": "bf16"}, {"label": "b", "precision": "bf16"}]) == "bf16"
    assert precisions([{"label": "a", "precision": "fp32"}, {"label": "b", "precision": "bf16"}]) == "a fp32, b bf16"
    assert precisions([{"label": "MF"}]) == ""


def test_error_bars_span_each_rows_interval():
    from thinkrec.experiments.report import _yerr

    err = _yerr([0.6, None, 0.7], [[0.5, 0.75], [0.1, 0.2], None])
    assert err.shape == (2, 3) and np.allclose(err, [[0.1, 0.0, 0.0], [0.15, 0.0, 0.0]])
    assert _yerr([0.6], None) is None


def test_a_new_run_at_another_precision_than_the_studys_runs_stops(tmp_path):
    """RUNS holds a run trained at bf16; on a machine where auto is fp32 (the suite's, tests/conftest.py) a new
    setting stops naming that run and the flag that goes on; asked for bf16 it goes on."""
    from thinkrec.experiments.runs import Config, check_precision
    from thinkrec.io import write_json

    (tmp_path / "shared").mkdir()
    write_json(tmp_path / "thinkrec" / "precision.json", {"name": "bf16", "requested": "auto", "device": "cpu",
                                                           "reason": "on another machine", "probe": None})
    cfg = Config(runs=tmp_path, scale="tiny")
    with pytest.raises(ExperimentError, match=r"thinkrec trained at bf16, but --precision auto is fp32.*--precision bf16"):
        check_precision(cfg, {"precision": "auto"})
    check_precision(cfg, {"precision": "bf16"})  # no error: the same precision as the runs there
    write_json(tmp_path / "tallrec" / "precision.json", {"name": "fp32", "requested": "fp32", "device": "cpu",
                                                          "reason": "asked for fp32", "probe": None})
    with pytest.raises(ExperimentError, match=r"tallrec trained at fp32, but --precision bf16 is bf16"):
        check_precision(cfg, {"precision": "bf16"})


def test_learning_curves_plot_every_stage_beside_the_floors(done, tmp_path):
    import matplotlib.image

    from thinkrec.experiments.curves import plot_curves

    runs = [done["runs"] / "thinkrec", done["runs"] / "collm"]
    paths = plot_curves(runs, tmp_path, "c")
    for png in paths[:2]:
        assert matplotlib.image.imread(png).shape[:2] == (FIG_PX[1], FIG_PX[0])
    curves = json.loads(paths[2].read_text())["curves"]
    thinkrec = curves[0]
    m = _metrics(done, "thinkrec")
    assert set(thinkrec["stages"]) == {"stage1", "stage2", "stage3"} and set(curves[1]["stages"]) == {"stage1", "stage2"}
    last = thinkrec["stages"]["stage3"][-1]
    batch = int(m["args"]["batch_size"])
    assert last["rows"] == m["stages"]["stage3"]["steps"] * batch
    assert last["auc"] == m["stages"]["stage3"]["history"][-1]["auc"]
    assert thinkrec["floors"]["like_rate"]["auc"] == m["valid_baselines"]["like_rate"]["auc"]


def test_headline_averages_seeds_and_reads_every_llm_row_beside_mf_and_the_floor(done, tmp_path):
    """Seed 0 reuses nothing of `done` (other test rows: the official sample); seeds 0 and 1 each train
    CoLLM-style and ThinkRec and score the official sample of the tiny test split whole."""
    argv = ["headline", *done["argv"][1:]]
    argv[argv.index("--runs") + 1] = str(tmp_path / "runs")
    argv[argv.index("--results") + 1] = str(tmp_path / "results")
    i = argv.index("--teacher")  # the fixture's fake teacher is gone: its traces instead
    argv[i:i + 4] = ["--traces", str(done["runs"] / "shared" / "reasoning" / "traces.jsonl")]
    out = main(argv + ["--seeds", "0,1"], log=lambda line: None)
    assert out["population"] == "official 25% test sample" and out["rows"] == 5 and out["seeds"] == [0, 1]
    assert list(out["methods"]) == ["MF", "like-rate", "CoLLM-style", "ThinkRec"]
    per_seed = [json.loads((tmp_path / "runs" / d / "thinkrec" / "metrics.json").read_text())["test_official_sample"]
                for d in ("tiny", "tiny-seed1")]
    assert all(p["rows"] == 5 for p in per_seed)
    t = out["methods"]["ThinkRec"]
    assert [s["seed"] for s in t["per_seed"]] == [0, 1]
    assert t["uauc"] == pytest.approx(np.mean([s["uauc"] for s in t["per_seed"]]), nan_ok=True)
    assert set(out["intervals"]["ThinkRec"]["vs"]) == {"MF", "like-rate"}
    saved = json.loads((tmp_path / "results" / "headline.json").read_text())
    assert saved["rows"] == 5 and "| ThinkRec |" in (tmp_path / "results" / "headline.md").read_text()
    # the same table from the runs named by hand (a run directory, or its scores.jsonl), one LLM row alone too
    from thinkrec.experiments import headline

    runs = {("tiny", 0), ("tiny-seed1", 1)}
    by_hand = headline.main([f"{label}@{seed}={tmp_path / 'runs' / d / name / ('infer/scores.jsonl' if seed else '')}"
                             for label, name in headline.HEADLINE for d, seed in sorted(runs)]
                            + ["--results", str(tmp_path / "by-hand"), "--scale", "tiny"])
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731  (NaN == NaN)
    assert same(by_hand["methods"], out["methods"]) and same(by_hand["intervals"], out["intervals"])
    alone = headline.main([f"CoLLM-style@0={tmp_path / 'runs' / 'tiny' / 'collm'}", "--results", str(tmp_path / "one")])
    assert list(alone["methods"]) == ["MF", "like-rate", "CoLLM-style"] and set(alone["intervals"]["CoLLM-style"]["vs"]) == {"MF", "like-rate"}
    # every run's rows are saved beside the table: a later `--seeds 2` (another day, another machine) trains
    # seed 2 only and reads seeds 0 and 1 from RESULTS; here nothing is trained, the runs are gone
    saved_rows = [json.loads(line) for line in headline.saved_scores(tmp_path / "results", "ThinkRec", 1).open()]
    assert [r["score"] for r in saved_rows] == [r["score"] for r in map(json.loads, (
        tmp_path / "runs" / "tiny-seed1" / "thinkrec" / "infer" / "scores.jsonl").open())]
    shutil.rmtree(tmp_path / "runs")
    again = main(argv + ["--seeds", "1"], log=lambda line: None)
    assert not (tmp_path / "runs").exists() and again["seeds"] == [0, 1]
    assert same(again["methods"], out["methods"]) and same(again["intervals"], out["intervals"])
    # one method of a seed missing: only that one trains again, the other is read
    headline.saved_scores(tmp_path / "results", "ThinkRec", 1).unlink()
    part = main(argv + ["--seeds", "1"], log=lambda line: None)
    assert (tmp_path / "runs" / "tiny-seed1" / "thinkrec" / "metrics.json").is_file()
    assert not (tmp_path / "runs" / "tiny-seed1" / "collm").exists() and not (tmp_path / "runs" / "tiny").exists()
    assert part["seeds"] == [0, 1] and [s["seed"] for s in part["methods"]["ThinkRec"]["per_seed"]] == [0, 1]
    assert same(part["methods"]["CoLLM-style"], out["methods"]["CoLLM-style"])
    with pytest.raises(ExperimentError, match="scale tiny, not cpu-small"):
        main([*argv[:argv.index("--scale")], *argv[argv.index("--scale") + 2:], "--scale", "cpu-small"],
             log=lambda line: None)


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_scale_is_flags_train_py_accepts(scale):
    """A scale is a set of train.py flags: each must parse (a typo or a bad value would fail hours later)."""
    import train
    from thinkrec.experiments.runs import flags

    args = train.parse(["--dataset", "csv", "--data-dir", "d", *flags(SCALES[scale].train)])
    for key, value in SCALES[scale].train.items():
        assert getattr(args, key) == value, key
