"""The facts teacher (thinkrec/reasoning/facts.py): traces that state counts from the training data, start
and end with the label's word, and are written only where the counts support the label."""

import json

import numpy as np

from tests.test_train_cli import _tiny_csv
from thinkrec.data import prepare
from thinkrec.data.history import build_histories
from thinkrec.reasoning.__main__ import synth_main
from thinkrec.train.data import read_traces


def test_facts_traces_state_true_counts_and_match_their_labels(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _tiny_csv(data)
    run = tmp_path / "run"
    out = run / "reasoning" / "traces.jsonl"
    argv = ["--dataset", "csv", "--data-dir", str(data), "--run-dir", str(run), "--teacher", "facts", "--select", "random",
            "--n", "0", "--no-progress"]
    summary = synth_main(argv)
    prep = prepare("csv", data_dir=data, quiet=True)
    n_train = int((prep.inter.split == 0).sum())
    assert summary["asked"] == n_train and summary["traces"] + summary["wrong"] == n_train and summary["traces"] > 0
    traces = [json.loads(x) for x in out.read_text().splitlines()]
    hist = build_histories(prep.inter.user, prep.inter.timestamp, 10)
    for t in traces:
        word = "Yes" if t["label"] else "No"
        assert t["reason"].startswith(f"{word}. ") and t["reason"].endswith(f": {word}.")
        h = [j for j in hist[t["row"]] if j >= 0]
        if h:
            liked = int(prep.inter.label[h].sum())
            assert f"liked {liked} of the {len(h)} " in t["reason"]
        assert f'"{prep.items[int(prep.inter.item[t["row"]])]["title"]}"' in t["reason"]
    assert set(read_traces(out, prep)) == {t["row"] for t in traces}  # train.py reads them
    failures = [json.loads(x) for x in out.with_name("traces.failures.jsonl").read_text().splitlines()] \
        if summary["wrong"] else []
    assert all(f["kind"] == "wrong" and not f["last_answer"].startswith("Yes" if f["label"] else "No")
               for f in failures)
    again = synth_main(argv)  # resumable: nothing asked twice
    assert again["asked"] == 0 and len(out.read_text().splitlines()) == len(traces)
    assert np.all(np.diff([t["row"] for t in traces]) > 0)
