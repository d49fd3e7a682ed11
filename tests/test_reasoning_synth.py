"""Reasoning traces (thinkrec/reasoning/reflect.py, synth.py): the Yes/No reading of an answer, the reflect
loop (rotating hints, empty answers, the round cap, teacher failures), sample selection, and a synth run
killed midway then resumed with no sample lost or written twice; one run through the fake OpenAI server."""

import json
import threading

import numpy as np
import pytest

from tests.test_train_cli import _tiny_csv
from thinkrec.reasoning.reflect import REFLECTS, SYSTEM, Task, answer_word, run_task
from thinkrec.reasoning.synth import failures_path, select_rows, synthesize
from thinkrec.reasoning.teacher import Reply, TeacherError


class Counter:
    def __init__(self):
        self.d = {"requests": 0, "retries": 0, "failures": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.lock = threading.Lock()

    def snapshot(self):
        with self.lock:
            return dict(self.d)


class ScriptTeacher:
    """answers(first turn, k-th call for that sample, messages, max_tokens) -> Reply | Exception; thread-safe."""

    name = "script"

    def __init__(self, answers):
        self.answers, self.stats, self.calls = answers, Counter(), []

    def chat(self, messages, max_tokens):
        key = messages[1]["content"]
        with self.stats.lock:
            self.stats.d["requests"] += 1
            self.calls.append((key, [dict(m) for m in messages], max_tokens))
            k = sum(1 for c, _, _ in self.calls if c == key) - 1
        out = self.answers(key, k, messages, max_tokens)
        if isinstance(out, Exception):
            raise out
        return out


def _task(label=1, row=0):
    return Task("train", row, "u1", "i1", label, f"first turn #{row}", '"Toy Story"', "movie")


def _reply(content, reasoning=None):
    return Reply(content, reasoning if reasoning is not None else content, {"prompt_tokens": 3, "completion_tokens": 5},
                 "stop")


@pytest.mark.parametrize("text,want", [("Yes, the user will.", "Yes"), ("no.", "No"), ("NOT likely... yes", "Yes"),
                                       ("Nobody knows; maybe No", "No"), ("Yesterday I said NO", "No"),
                                       ("I cannot tell", None), ("", None)])
def test_answer_word_is_the_first_yes_or_no_word(text, want):
    assert answer_word(text) == want


def test_right_first_time_records_label_word_and_collapsed_reasoning():
    t = ScriptTeacher(lambda row, k, m, mt: _reply("Yes.", "<think> The user\n\n likes   comedies </think>"))
    out = run_task(t, _task(label=1))
    assert out.ok and out.rounds == 1
    assert out.record["reason"] == "Yes. The user likes comedies"
    assert out.record["usage"] == {"prompt_tokens": 3, "completion_tokens": 5}
    assert t.calls[0][1] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "first turn #0"}]


def test_reflect_rotates_hints_and_keeps_the_last_rounds_reasoning():
    answers = ["Yes, surely", "Yes again", "No: it is a horror fan", ]
    t = ScriptTeacher(lambda row, k, m, mt: _reply(answers[k], f"reasoning {k}"))
    out = run_task(t, _task(label=0))
    assert out.ok and out.rounds == 3 and out.record["reason"] == "No. reasoning 2"
    second, third = t.calls[1][1], t.calls[2][1]
    assert second[2] == {"role": "assistant", "content": "Yes, surely"}  # the first answer stays in the chat
    assert second[3]["content"] == REFLECTS[0].format(answer="No", noun="movie", target='"Toy Story"')
    assert len(third) == 4 and third[3]["content"].startswith("The accurate answer is No.")  # replaced, not appended


def test_empty_answers_raise_max_tokens_then_count_as_rounds():
    t = ScriptTeacher(lambda row, k, m, mt: _reply("", "thinking...") if mt < 3000 else _reply("Yes", "done"))
    out = run_task(t, _task(label=1), max_tokens=1024)
    assert out.ok and out.rounds == 1
    assert [c[2] for c in t.calls] == [1024, 1536, 2048, 2560, 3000]


def test_round_cap_and_teacher_errors_are_failures_not_exceptions():
    t = ScriptTeacher(lambda row, k, m, mt: _reply("Yes"))
    out = run_task(t, _task(label=0), max_rounds=3)
    assert not out.ok and out.record["kind"] == "wrong" and out.rounds == 3 and out.record["last_answer"] == "Yes"
    err = ScriptTeacher(lambda row, k, m, mt: TeacherError("HTTP 500 after 6 retries"))
    out = run_task(err, _task())
    assert not out.ok and out.record["kind"] == "error" and "HTTP 500" in out.record["error"]


@pytest.fixture
def prep(tmp_path):
    from thinkrec.data import load_prepared, prepare

    data = tmp_path / "data"
    data.mkdir()
    _tiny_csv(data)
    prepare("csv", data_dir=data, out=tmp_path / "run", quiet=True, noun="movie")
    return load_prepared(tmp_path / "run")


def test_select_rows(prep, tmp_path):
    train = np.flatnonzero(prep.inter.split == 0)
    r = select_rows(prep, "random", n=5, seed=1)
    assert len(r) == 5 and set(r) <= set(train) and np.array_equal(r, select_rows(prep, "random", n=5, seed=1))
    scores = tmp_path / "scores.jsonl"
    lines = [{"row": int(x), "prob": p, "label": int(prep.inter.label[x])} for x, p in zip(train[:4], (0.9, 0.1, 0.6, 0.4))]
    scores.write_text("".join(json.dumps(x) + "\n" for x in lines))
    wrong = [x["row"] for x in lines if (x["prob"] > 0.5) != bool(x["label"])]
    assert select_rows(prep, "errors", scores=scores).tolist() == sorted(wrong)
    bad = tmp_path / "bad.jsonl"
    test_row = int(np.flatnonzero(prep.inter.split == 2)[0])
    bad.write_text(json.dumps({"row": test_row, "prob": 0.9, "label": 0}) + "\n")
    from thinkrec.data import DataError

    with pytest.raises(DataError, match=r"bad.jsonl:1: row .* is not a training row"):
        select_rows(prep, "errors", scores=bad)


class Killed(Exception):
    pass


def test_synth_killed_then_resumed_loses_and_repeats_nothing(prep, tmp_path):
    rows = select_rows(prep, "random", n=12, seed=0)
    out = tmp_path / "reasoning" / "traces.jsonl"

    labels = {int(r): int(prep.inter.label[r]) for r in rows}
    first_turns = {}

    def script(key, k, m, mt):  # odd rows answer right at once, even rows after one reflection
        r = first_turns[key]
        if r == int(rows[3]):
            return TeacherError("HTTP 503 after 6 retries")  # a teacher failure: asked again on the rerun
        want = "Yes" if labels[r] else "No"
        return _reply(want if (k >= 1 or r % 2) else ("No" if want == "Yes" else "Yes"), f"why {r}")

    from thinkrec.reasoning.synth import make_tasks

    for task in make_tasks(prep, rows):
        first_turns[task.prompt] = task.row
    teacher = ScriptTeacher(script)
    # kill after 5 records were appended: the 6th append raises (and a half line is left, as a kill would)
    from thinkrec import io

    real_append, n = io.AppendLog.append, [0]

    def dying_append(self, obj):
        n[0] += 1
        if n[0] == 6:
            with open(self.path, "ab") as f:
                f.write(b'{"split": "train", "row": 12')
            raise Killed
        return real_append(self, obj)

    io.AppendLog.append = dying_append
    try:
        with pytest.raises(Killed):
            synthesize(prep, rows, teacher, out, concurrency=1, progress=False, log=lambda *a: None)
    finally:
        io.AppendLog.append = real_append
    before = len(teacher.calls)
    summary = synthesize(prep, rows, teacher, out, concurrency=4, progress=False, log=lambda *a: None)
    traces = [json.loads(x) for x in out.read_text().splitlines()]
    fails = [json.loads(x) for x in failures_path(out).read_text().splitlines()]
    assert sorted(t["row"] for t in traces) == sorted(int(r) for r in rows if r != rows[3])  # none lost, none twice
    assert all(f["row"] == int(rows[3]) and f["kind"] == "error" for f in fails)
    assert all(t["reason"].startswith(("Yes. why", "No. why")) and t["reason"].split(".")[0] ==
               ("Yes" if t["label"] else "No") for t in traces)
    assert summary["finished_before"] >= 4 and summary["traces"] + summary["finished_before"] >= len(rows) - 1
    assert len(teacher.calls) > before
    # the file is what train.py reads
    from thinkrec.train import read_traces

    assert set(read_traces(out, prep)) == {int(r) for r in rows if r != rows[3]}
    # a third run asks only for the row whose teacher failed
    calls = len(teacher.calls)
    s3 = synthesize(prep, rows, teacher, out, concurrency=2, progress=False, log=lambda *a: None)
    assert s3["asked"] == 1 and len(teacher.calls) == calls + 1


def test_synth_cli_through_the_fake_server(tmp_path, capsys, monkeypatch):
    """python -m thinkrec.reasoning synth against an OpenAI-compatible server that answers "Yes" first, then
    what the reflect turn states, fails some requests with 500 and 429, and puts its reasoning in
    reasoning_content: every sample gets a trace, retries are counted, and train.py's reader accepts it."""
    from tests.fake_openai import FakeOpenAI, reply, status
    from thinkrec.reasoning.__main__ import main

    data = tmp_path / "data"
    data.mkdir()
    _tiny_csv(data)
    monkeypatch.setenv("THINKREC_TEACHER_API_KEYS", "k1,k2")

    def handler(req, i):
        if i % 7 == 3:
            return status(500)
        if i % 11 == 5:
            return status(429, {"Retry-After": "0"})
        last = req["messages"][-1]["content"]
        word = "No" if "response is No" in last or "answer is No" in last else "Yes"
        return reply(f"{word}.", reasoning=f"thinking about\n {len(req['messages'])} turns",
                     usage={"prompt_tokens": 10, "completion_tokens": 4})

    with FakeOpenAI(handler) as srv:
        import thinkrec.reasoning.teacher as teacher_mod

        monkeypatch.setattr(teacher_mod.time, "sleep", lambda s: None)  # backoff without waiting
        rc = main(["synth", "--dataset", "csv", "--data-dir", str(data), "--run-dir", str(tmp_path / "run"),
                   "--teacher", srv.url, "--teacher-model", "fake", "--n", "10", "--concurrency", "4", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["traces"] == 10 and summary["wrong"] == summary["errors"] == 0
    assert summary["retries"] >= 2 and 1 <= summary["mean_rounds"] <= 2
    assert summary["prompt_tokens"] == 10 * summary["requests"]
    from thinkrec.data import load_prepared
    from thinkrec.train import read_traces

    traces = read_traces(tmp_path / "run" / "reasoning" / "traces.jsonl", load_prepared(tmp_path / "run"))
    assert len(traces) == 10 and all(t.split(". ", 1)[1].startswith("thinking about") for t in traces.values())
