"""Reproducible and resumable: two fresh runs of train.py give the same artifacts bit for bit, and a run
killed at each phase boundary, before a stage's first checkpoint or after a mid-stage one, then continued
with --resume, ends with the same artifacts as a run never stopped. A "kill" is an exception raised from a
patched function at that point, in the same process (so the resumed run also starts from whatever RNG state
the killed one left). One live run per directory; bad input stops the run with one line, exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train_cli import _tiny_csv, _tiny_model_dir

pytest.importorskip("faiss")

ROOT = Path(__file__).resolve().parents[1]


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("inputs")
    data = base / "data"
    data.mkdir()
    return _tiny_model_dir(base / "model"), _tiny_csv(data)


def _argv(inputs, run):
    model, data = inputs
    # --eval-every 1: a checkpoint after every step, so some kills land after a mid-stage checkpoint;
    # dropout 0.05 (the default LoRA config) makes the RNG state matter
    return ["--dataset", "csv", "--data-dir", str(data), "--model", str(model), "--run-dir", str(run),
            "--experts", "2", "--max-train-samples", "12", "--max-eval-samples", "8", "--max-test-samples", "14",
            "--batch-size", "5", "--cf-dim", "8", "--expert-layers", "1", "--max-len", "400", "--lr", "1e-3",
            "--eval-every", "1", "--no-progress", "--threads", "1"]


def _artifacts(run: Path) -> dict:
    from thinkrec.io import run_fingerprint

    return run_fingerprint(run)


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"artifacts differ from the uninterrupted run: {differ}"


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    import train

    run = tmp_path_factory.mktemp("reference") / "run"
    train.main(_argv(inputs, run))
    return _artifacts(run)


def test_two_fresh_runs_are_identical(inputs, reference, tmp_path):
    import train

    torch.manual_seed(1234)  # whatever state the process is in
    train.main(_argv(inputs, tmp_path / "run"))
    _assert_same(_artifacts(tmp_path / "run"), reference)


def _nth_call_raises(real, n):
    calls = []

    def wrapped(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise Killed
        return real(*a, **kw)
    return wrapped


def _after_nth_call_raises(real, n):
    calls = []

    def wrapped(*a, **kw):
        out = real(*a, **kw)
        calls.append(1)
        if len(calls) == n:
            raise Killed
        return out
    return wrapped


# (what is patched, which call dies): 3 micro-batches a stage at 12 rows / batch 5, a checkpoint per step
KILLS = {
    "after data": ("train.train_cf", _nth_call_raises, 1),
    "after CF": ("train.build_groups", _nth_call_raises, 1),
    "after groups": ("train.ThinkRecLM.from_pretrained", _nth_call_raises, 1),
    "stage 1 before its first checkpoint": ("thinkrec.train.loop.batch_loss", _nth_call_raises, 1),
    "stage 1 after a checkpoint": ("thinkrec.train.checkpoint.save", _after_nth_call_raises, 2),
    "between stage 1 and 2": ("train.save_adapters", _after_nth_call_raises, 1),
    "stage 2 before its first checkpoint": ("thinkrec.train.loop.batch_loss", _nth_call_raises, 4),
    "stage 3 after a checkpoint": ("thinkrec.train.checkpoint.save", _after_nth_call_raises, 7),
    "before the test": ("train.score_rows", _nth_call_raises, 1),
    "in the middle of the test": ("thinkrec.infer.score.ScoreLog.append", _after_nth_call_raises, 1),  # 2 batches
}


@pytest.mark.parametrize("kill", list(KILLS))
def test_killed_and_resumed_run_equals_uninterrupted(kill, inputs, reference, tmp_path, monkeypatch):
    import importlib

    import train

    target, make, n = KILLS[kill]
    path, _, attr = target.rpartition(".")
    owner, rest = None, path.split(".")  # the longest importable prefix, then attributes (a class in a module)
    for k in range(len(rest), 0, -1):
        try:
            owner = importlib.import_module(".".join(rest[:k]))
        except ModuleNotFoundError:
            continue
        rest = rest[k:]
        break
    for name in rest:
        owner = getattr(owner, name)
    real = getattr(owner, attr)
    with monkeypatch.context() as m:
        m.setattr(owner, attr, make(real, n))
        with pytest.raises(Killed):
            train.main(_argv(inputs, tmp_path / "run"))
    torch.manual_seed(99)  # the new process starts from another RNG state
    train.main(_argv(inputs, tmp_path / "run") + ["--resume"])
    _assert_same(_artifacts(tmp_path / "run"), reference)


def test_second_run_on_a_held_directory_fails_fast(inputs, tmp_path):
    from thinkrec.io import RunLock, RunLockedError

    import train

    with RunLock(tmp_path / "run", "another train.py"):
        with pytest.raises(RunLockedError, match="in use by PID"):
            train.main(_argv(inputs, tmp_path / "run"))


@pytest.mark.parametrize("change, message", [
    (["--model", "/nonexistent/model"], "neither a model directory"),
    (["--experts", "0"], "--experts: invalid _number value|must be >= 1"),
    (["--data-dir", "/nonexistent/data"], "--data-dir /nonexistent/data: no such file"),
    (["--experts", "11"], "--experts 11 is more than the 10 users"),
])
def test_bad_input_stops_with_one_line(change, message, inputs, tmp_path):
    import re

    argv = _argv(inputs, tmp_path / "run")
    for flag, value in zip(change[::2], change[1::2]):
        argv[argv.index(flag) + 1] = value
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and re.search(message, p.stderr), p.stderr[-2000:]
    assert not (tmp_path / "run" / "cf").exists()  # nothing long ran
