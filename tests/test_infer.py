"""infer.py and thinkrec.infer on a tiny trained run: mixed-route batches against merged adapters, train.py's
test metrics reproduced, a killed scoring job continued to the same file, input checking, ranking with a
shared prefix against scoring each candidate alone, explanations with references."""

import copy
import json

import numpy as np
import pytest
import torch

from tests.test_train_cli import train_tiny_run
from tests.train_fixtures import PAD, sample_set, tiny_lm
from thinkrec.data import DataError
from thinkrec.infer import RunError, ScoreLog, load_run, read_input, score_rows, score_samples, split_rows
from thinkrec.infer.rank import rank_items, read_candidates, user_history
from thinkrec.model.lora import merge_lora

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("infer"))


def _argv(run, out, *extra):
    return ["--run-dir", str(run), "--out", str(out), "--no-progress", "--threads", "1", *extra]


def test_mixed_route_batch_equals_each_row_with_its_adapters_merged():
    lm = tiny_lm(layers=3, n_experts=2, cf_dim=5)
    lm.eval()
    sset = sample_set(16, ids=True, seed=1)
    g = torch.Generator().manual_seed(0)
    ue, ie = torch.randn(6, 5, generator=g), torch.randn(11, 5, generator=g)
    w = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, .3, .7], [.2, .5, .3], [0, 1, 0]], dtype=torch.float32)
    samples = [sset.sample(i) for i in range(len(w))]
    together = score_samples(lm, samples, w, ue, ie, PAD)
    for r in range(len(w)):
        merged = copy.deepcopy(lm)
        merge_lora(merged.llm, w[r])
        alone = score_samples(merged, [samples[r]], torch.zeros(1, 3), ue, ie, PAD)
        assert abs(alone[0] - together[r]) < 1e-4, (r, alone[0], together[r])
    # the routes matter: the expert rows would score differently under the global adapter
    glob = score_samples(lm, samples, torch.tensor([[1.0, 0, 0]]).expand(len(w), 3), ue, ie, PAD)
    assert np.abs(glob[1:5] - together[1:5]).min() > 1e-3


@pytest.mark.smoke
def test_infer_reproduces_train_test_metrics_and_writes_scores(run, tmp_path):
    import infer

    m = infer.main(_argv(run, tmp_path / "out"))
    saved = json.loads((run / "metrics.json").read_text())
    assert m["all"]["thinkrec"] == pytest.approx(saved["test"], abs=1e-9)
    assert m["all"]["cf"] == pytest.approx(saved["test_cf"], abs=1e-12)
    lines = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [x["pos"] for x in lines] == list(range(saved["test_rows"]))
    assert sum(m["routing"].values()) == len(lines)
    assert {x["route"] for x in lines} <= {"global", "expert_1", "expert_2", "mixture"}
    for x in lines:
        assert x["prob"] == pytest.approx(1 / (1 + np.exp(-x["score"])))
        assert x["route"] != "global" or x["weights"][0] == 1.0
    # the run's own copy, written by train.py through the same path (other batch sizes: float noise only)
    ours = [json.loads(x)["score"] for x in (run / "infer" / "scores.jsonl").read_text().splitlines()]
    assert ours == pytest.approx([x["score"] for x in lines], abs=1e-5)
    assert not list((tmp_path / "out").glob("*.partial.*"))


def test_killed_scoring_continues_to_the_same_file(run, tmp_path, monkeypatch):
    loaded = load_run(run)
    rows = split_rows(loaded.prep, "test")
    score_rows(loaded, rows, tmp_path / "full", max_rows=3, log=lambda *a: None)
    want = (tmp_path / "full" / "scores.jsonl").read_bytes()

    calls = []
    real = ScoreLog.append

    def killed(self, lines):
        calls.append(len(lines))
        if len(calls) == 3:  # the third batch is cut in the middle of a line
            with open(self.partial, "a") as f:
                f.write(json.dumps(lines[0])[:17])
            raise KeyboardInterrupt
        real(self, lines)

    monkeypatch.setattr(ScoreLog, "append", killed)
    with pytest.raises(KeyboardInterrupt):
        score_rows(loaded, rows, tmp_path / "cut", max_rows=3, log=lambda *a: None)
    monkeypatch.setattr(ScoreLog, "append", real)
    assert not (tmp_path / "cut" / "scores.jsonl").exists()
    assert len((tmp_path / "cut" / "scores.partial.jsonl").read_text().splitlines()) == 7  # 2 batches + a cut line
    said = []
    score_rows(loaded, rows, tmp_path / "cut", max_rows=3, log=said.append)
    assert "6 of" in said[0]
    assert (tmp_path / "cut" / "scores.jsonl").read_bytes() == want
    # other arguments over a partial file are refused, not mixed
    monkeypatch.setattr(ScoreLog, "append", killed)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        score_rows(loaded, rows, tmp_path / "other", max_rows=3, log=lambda *a: None)
    monkeypatch.setattr(ScoreLog, "append", real)
    from thinkrec.io import ArtifactError

    with pytest.raises(ArtifactError, match="max_rows"):
        score_rows(loaded, rows, tmp_path / "other", max_rows=4, log=lambda *a: None)


def test_bad_input_names_the_line_and_writes_nothing(run, tmp_path):
    import infer

    prep = load_run(run).prep
    good = '{"user_id": "1", "item_id": "3", "label": 1}\n'
    cases = {
        '{"user_id": "1", "item_id": 3\n': r"rows\.jsonl:2: not JSON",
        '{"user_id": "999", "item_id": "3"}\n': r"rows\.jsonl:2: unknown user_id '999'",
        '{"user_id": "1", "item_id": "77"}\n': r"rows\.jsonl:2: unknown item_id '77'",
        '{"user_id": "1", "item_id": "3", "label": 2}\n': r"rows\.jsonl:2: label must be 0 or 1",
        '{"user_id": "1", "item_id": "3", "history": [{"label": 1}]}\n': r"rows\.jsonl:2: history must be",
        '{"item_id": "3"}\n': r'rows\.jsonl:2: expected an object with "user_id"',
    }
    for bad, msg in cases.items():
        path = tmp_path / "rows.jsonl"
        path.write_text(good + bad)
        with pytest.raises(DataError, match=msg):
            read_input(path, prep)
        with pytest.raises(DataError, match=msg):
            infer.main(_argv(run, tmp_path / "out", "--input", str(path)))
        assert not (tmp_path / "out" / "scores.jsonl").exists()
    # a byte that is not UTF-8: the line, not a UnicodeDecodeError traceback
    path.write_bytes(good.encode() + b'{"user_id": "1", "item_id": "3", "title": "Caf\xe9"}\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2: not UTF-8 \(byte 0xe9 at column 47\)"):
        read_input(path, prep, allow_unknown=True)
    # what a reasonable file holds: a BOM, CRLF line ends, trailing blank lines
    path.write_bytes(b"\xef\xbb\xbf" + good.replace("\n", "\r\n").encode() * 2 + b"\r\n\r\n")
    assert len(read_input(path, prep)) == 2
    # --allow-unknown: scored with the global adapter, counted
    path.write_text(good + '{"user_id": "999", "item_id": "77", "title": "New Film (2030)"}\n')
    m = infer.main(_argv(run, tmp_path / "out", "--input", str(path), "--allow-unknown"))
    assert m["unknown"] == {"users": 1, "items": 1} and m["rows"] == 2
    lines = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert lines[1]["route"] == "global" and lines[1]["mf_score"] is None and lines[1]["user_id"] == "999"


def test_input_history_is_used(run, tmp_path):
    import infer

    path = tmp_path / "rows.jsonl"
    base = {"user_id": "2", "item_id": "5"}
    path.write_text("\n".join(json.dumps({**base, "history": h}) for h in (
        [], [{"item_id": "1", "label": 1}, {"item_id": "7", "label": 0}], [{"item_id": "7", "label": 0}])) + "\n")
    infer.main(_argv(run, tmp_path / "out", "--input", str(path)))
    scores = [json.loads(x)["score"] for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert len(set(scores)) == 3


def test_rows_sharing_a_prefix_score_as_if_alone(run, tmp_path):
    """Rows of one user with one history (as rows rated in the same second have) run their prefix once; the
    scores equal scoring every row alone."""
    from thinkrec.infer import read_input
    from thinkrec.scoring import ScoreJob, plan_units

    path = tmp_path / "rows.jsonl"
    hist = [{"item_id": "1", "label": 1}, {"item_id": "7", "label": 0}]
    lines = [{"user_id": u, "item_id": i, "label": k % 2, "history": hist} for k, (u, i) in
             enumerate([("2", "5"), ("2", "3"), ("2", "9"), ("3", "5"), ("2", "11"), ("3", "4"), ("4", "2")])]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    loaded = load_run(run)
    rows = read_input(path, loaded.prep)
    shared = score_rows(loaded, rows, tmp_path / "shared", max_rows=3, log=lambda *a: None)
    alone = score_rows(loaded, rows, tmp_path / "alone", share_prefix=False, log=lambda *a: None)
    read = [[json.loads(x)["score"] for x in (tmp_path / d / "scores.jsonl").read_text().splitlines()]
            for d in ("shared", "alone")]
    np.testing.assert_allclose(read[0], read[1], atol=1e-4)
    # each job's AUC is that of the scores it wrote (the two AUCs themselves may differ: the tiny model's scores
    # lie within 1e-4 of each other, so rounding alone can swap two of them, e.g. under bf16)
    from thinkrec.metrics import auc

    for got, scores in zip((shared, alone), read):
        assert got["all"]["thinkrec"]["auc"] == pytest.approx(auc(scores, [x["label"] for x in lines]))
    builder = loaded.builder("reason")
    job = ScoreJob(lambda i: builder.sample_for(rows.user[i], rows.item[i], rows.history[i]), np.ones(len(rows)),
                   torch.zeros(len(rows), 3), cut=lambda smp, i: builder.target_start(smp, int(rows.item[i])))
    units = [(idx.tolist(), c is not None) for idx, c in plan_units(job, max_rows=3)]
    assert units == [([6], False), ([0, 1, 2], True), ([4], True), ([3, 5], True)]  # user 2's 4 rows in chunks of 3


def test_int8_scores_do_not_depend_on_the_rows_beside_them(run, tmp_path):
    """int8 scoring is batch-invariant (scoring.run_job alone=True): a row scored in a file of one gets the same
    score, bit for bit, as beside rows that share its prefix or its batch; the plan makes every row a prefix and
    a suffix of its own."""
    from thinkrec.infer import read_input
    from thinkrec.scoring import ScoreJob, plan_units

    hist = [{"item_id": "1", "label": 1}, {"item_id": "7", "label": 0}]
    lines = [{"user_id": u, "item_id": i, "label": k % 2, "history": hist} for k, (u, i) in
             enumerate([("2", "5"), ("2", "3"), ("2", "9"), ("3", "5"), ("4", "2")])]
    loaded = load_run(run, precision="int8")

    def scores(sel, name):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(lines[k]) for k in sel) + "\n")
        m = score_rows(loaded, read_input(path, loaded.prep), tmp_path / name, max_rows=3, log=lambda *a: None)
        assert m["batch_invariant"] is True
        return [json.loads(x)["score"] for x in (tmp_path / name / "scores.jsonl").read_text().splitlines()]

    together = scores(range(len(lines)), "all")
    for k in range(len(lines)):
        assert scores([k], f"row{k}") == [together[k]], k
    rows = read_input(tmp_path / "all.jsonl", loaded.prep)
    builder = loaded.builder("reason")
    job = ScoreJob(lambda i: builder.sample_for(rows.user[i], rows.item[i], rows.history[i]), np.ones(len(rows)),
                   torch.zeros(len(rows), 3), cut=lambda smp, i: builder.target_start(smp, int(rows.item[i])))
    units = [(idx.tolist(), c is not None) for idx, c in plan_units(job, max_rows=3, alone=True)]
    assert units == [([0, 1, 2], True), ([3], True), ([4], True)]
    job.cut = None
    assert [idx.tolist() for idx, c in plan_units(job, alone=True)] == [[k] for k in range(len(rows))]


def test_rank_with_shared_prefix_equals_scoring_each_candidate(run, tmp_path, capsys):
    import infer
    from thinkrec.infer import row_weights

    loaded = load_run(run)
    user = 3
    items = read_candidates("all", loaded, user)
    assert len(items) > 3
    shared = rank_items(loaded, user, items, chunk=3)
    builder, hist = loaded.builder("reason"), user_history(loaded.prep, user)
    ue, ie = loaded.token_tables()  # what the run's CF tokens are projected from ([P_u, b_u] / [Q_i, c_i])
    alone = np.array([score_samples(loaded.lm, [builder.sample_for(user, int(i), hist)],
                                    row_weights(loaded, np.array([user])), ue, ie, loaded.tok.pad_token_id)[0]
                      for i in items])
    np.testing.assert_allclose(shared, alone, atol=2e-5, rtol=0)
    top = infer.main(_argv(run, tmp_path / "out", "--rank", "--user", loaded.prep.users[user], "--top", "3"))
    assert [x["rank"] for x in top] == [1, 2, 3]
    assert [x["score"] for x in top] == pytest.approx(sorted(shared, reverse=True)[:3], abs=2e-5)
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert printed == top == [json.loads(x) for x in (tmp_path / "out" / f"rank-{top[0]['user_id']}.jsonl")
                              .read_text().splitlines()]


def test_explain_writes_explanations_and_scores_them_against_references(run, tmp_path):
    import infer

    loaded = load_run(run)
    rows = split_rows(loaded.prep, "test")
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"row": int(r), "reason": "Yes the user likes comedies"}) + "\n"
                            for r in rows.data_row[:2]))
    m = infer.main(_argv(run, tmp_path / "out", "--max-rows", "0", "--explain", "3", "--max-new-tokens", "6",
                         "--references", str(refs)))
    lines = [json.loads(x) for x in (tmp_path / "out" / "explanations.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and m["with_reference"] == 2
    assert all(1 <= x["new_tokens"] <= 6 for x in lines)
    assert "reference" in lines[0] and "reference" not in lines[2]
    for name in ("meteor", "bleu4", "rouge_l"):
        v = m["text"][name]
        assert (v["value"] is not None and 0 <= v["value"] <= 1) or v["unavailable"]
    assert m["text"]["bleurt"]["value"] is None and "checkpoint" in m["text"]["bleurt"]["unavailable"]


SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "ml1m-collm"


@pytest.mark.skipif(not (SHARED / "test_official_sample.txt").exists(), reason="shared ML-1M split not present")
def test_official_sample_maps_to_the_runs_test_rows():
    from thinkrec.data import prepare
    from thinkrec.infer.rows import official_sample

    prep = prepare("csv", data_dir=SHARED, quiet=True)
    rows = official_sample(prep, SHARED, "test")
    assert len(rows) == len(np.unique(rows)) == 1833
    assert (prep.inter.split[rows] == 2).all()
    # position 0 of the file is the 616th test row of interactions.csv (0-based 615): same user, item, time
    import csv

    with open(SHARED / "interactions.csv") as f:
        test = [r for r in csv.DictReader(f) if r["split"] == "test"]
    first = int((SHARED / "test_official_sample.txt").read_text().split()[0])
    want = test[first]
    hits = [r for r in rows if prep.users[prep.inter.user[r]] == want["user_id"]
            and prep.items[prep.inter.item[r]]["raw_id"] == want["item_id"]
            and prep.inter.timestamp[r] == int(want["timestamp"])]
    assert len(hits) == 1
    # without the file the rule itself (RandomState(2025), 25% of the split's rows in order) gives the same rows
    for split in ("valid", "test"):
        assert np.array_equal(official_sample(prep, None, split), official_sample(prep, SHARED, split))


def test_cli_exit_status_and_message_on_bad_input(run, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "rows.jsonl"
    path.write_text('{"user_id": "1", "item_id": "3"}\n{"user_id": "1", "item_id": "3", "label": "yes"}\n')
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "infer.py"), *_argv(run, tmp_path / "out", "--input", str(path))],
                       capture_output=True, text=True, cwd=root)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == f"infer.py: error: {path}:2: label must be 0 or 1, got 'yes'"
    assert not (tmp_path / "out").exists()


def test_stage2_scores_with_the_global_adapter_and_the_history_rule_is_recorded(run, tmp_path):
    """--stage stage2 (what chooses the samples for reasoning traces): every user on the global adapter, as
    the experts train only in stage 3; --history file is used and recorded."""
    import infer

    m = infer.main(_argv(run, tmp_path / "out", "--stage", "stage2", "--history", "file", "--titles", "no-year"))
    assert (m["stage"], m["history"], m["titles"]) == ("stage2", "file", "no-year")
    assert set(m["routing"]) == {"global"}
    lines = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert all(x["weights"][0] == 1.0 for x in lines)
    with pytest.raises(RunError, match="not one of"):
        from thinkrec.infer.run import final_stage

        final_stage(run, "stage4")
