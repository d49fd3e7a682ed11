"""Run-directory files: the run lock, stale temporaries of killed writes, one-line errors for damaged
artifacts written by our own writers, file modes, and standard JSON only."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from tests.data_fixtures import toy_prepared
from thinkrec.cf.mf import MF
from thinkrec.cf.train import load_embeddings
from thinkrec.cf.train import save as save_cf
from thinkrec.data.prepared import load_prepared, save_prepared
from thinkrec.experts import GroupConfig, build_groups, load_groups
from thinkrec.io import (FILE_MODE, ArtifactError, RunLock, RunLockedError, _read_umask, atomic_file,
                         atomic_write_bytes, clean_stale_temps, read_json, write_json)
from thinkrec.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _python(script: Path, code: str, *args, **kw) -> subprocess.Popen:
    """A child `python script args` running `code`, with the repository importable; stdout piped."""
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, script.name, *map(str, args)], cwd=script.parent,
                            stdout=subprocess.PIPE, env=env, text=True, **kw)


# --- the run lock

HOLD = """
import sys, time
from thinkrec.io import RunLock
with RunLock(sys.argv[1], "holder.py"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_names_the_live_holder_and_is_taken_over_after_sigkill(tmp_path):
    run = tmp_path / "run"  # created by the lock
    child = _python(tmp_path / "holder.py", HOLD, run, "--run-dir", run)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError) as e:
            with RunLock(run, "train.py"):
                pass
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{run} is in use by PID {child.pid} (")
        assert f"(python holder.py {run} --run-dir {run}), started 20" in msg and msg.endswith("wait for it or stop it")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    with RunLock(run, "train.py"):  # the kernel released the dead holder's lock
        holder = json.loads((run / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["what"] == "train.py"
    assert (run / ".lock").read_text() == ""  # released: describes no one


def test_lock_is_exclusive_within_a_process_and_reusable(tmp_path):
    with RunLock(tmp_path, "train.py"):
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()} "):
            RunLock(tmp_path, "infer.py").__enter__()
    with RunLock(tmp_path, "infer.py"):
        pass


# --- temporaries of killed writes

KILLED_WRITE = """
import os, signal, sys
from thinkrec.io import atomic_file
with atomic_file(sys.argv[1]) as f:
    f.write(b"half")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_clean_stale_temps_removes_only_killed_writes(tmp_path):
    run = tmp_path / "run"
    child = _python(tmp_path / "writer.py", KILLED_WRITE, run / "stage1" / "ckpt" / "ckpt.safetensors")
    child.communicate()
    assert child.returncode == -signal.SIGKILL
    (run / "data").mkdir()
    (run / "data" / ".interactions.tmp.npz").write_bytes(b"PK")  # an older save_prepared's temporary
    keep = [run / "data" / "stats.json", run / "notes.tmp", run / ".lock", run / "stage1" / "adapters.json"]
    for p in keep:
        p.write_text("{}")
    stale = sorted(p for p in run.rglob(".*") if p.name not in (".lock",))
    assert len(stale) == 2 and all(p.is_file() for p in stale)
    with RunLock(run, "train.py"):
        assert clean_stale_temps(run) == stale
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert clean_stale_temps(run) == []


# --- damaged artifacts: one line naming the file and what to delete

def _prepared(tmp_path):
    rows = [(u, i, (u + i) % 2, 10 * u + i, 0 if i < 4 else 2) for u in range(6) for i in range(5)]
    prep = toy_prepared(rows)
    save_prepared(prep, tmp_path)
    return prep


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _one_line(e, path, hint):
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path} is damaged (") and msg.endswith(hint), msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no library traceback chained


@pytest.mark.parametrize("name", ["interactions.npz", "users.json", "items.jsonl", "stats.json"])
def test_damaged_prepared_data(tmp_path, name):
    _prepared(tmp_path)
    assert load_prepared(tmp_path).n_users == 6
    _truncate(tmp_path / "data" / name)
    with pytest.raises(ArtifactError) as e:
        load_prepared(tmp_path)
    _one_line(e, tmp_path / "data" / name, f"delete {tmp_path / 'data'}/ to prepare the data again")
    if name == "items.jsonl":
        assert "line 4 is not valid JSON" in str(e.value)


def test_corrupt_npz_fails_its_crc(tmp_path):
    _prepared(tmp_path)
    path = tmp_path / "data" / "interactions.npz"
    raw = bytearray(path.read_bytes())
    raw[200] ^= 0xFF  # inside the first array's data: the zip CRC catches it
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="Bad CRC-32"):
        load_prepared(tmp_path)


def _cf(tmp_path, prep):
    torch.manual_seed(0)
    return save_cf(tmp_path, "mf", MF(prep.n_users, prep.n_items, 4), prep, {"selected": {"valid_auc": math.nan}})


def test_damaged_cf_embeddings(tmp_path):
    prep = _prepared(tmp_path)
    path = _cf(tmp_path, prep)
    assert load_embeddings(tmp_path, "mf")["user_emb"].shape == (6, 4)
    assert read_json(tmp_path / "cf" / "mf.json", "")["selected"]["valid_auc"] is None
    _truncate(path)
    with pytest.raises(ArtifactError) as e:
        load_embeddings(tmp_path, "mf")
    _one_line(e, path, "delete it to retrain the CF model mf")
    with pytest.raises(FileNotFoundError, match="thinkrec.cf train --cf-model sasrec"):
        load_embeddings(tmp_path, "sasrec")


def test_damaged_expert_groups(tmp_path):
    prep = _prepared(tmp_path)
    _cf(tmp_path, prep)
    build_groups(tmp_path, GroupConfig(groups=2))
    path = tmp_path / "experts" / "groups.safetensors"
    assert load_groups(tmp_path)["weights"].shape == (6, 3)
    _truncate(path, 0.3)
    with pytest.raises(ArtifactError) as e:
        load_groups(tmp_path)
    _one_line(e, path, f"delete {tmp_path / 'experts'}/ to rebuild the expert groups")


class _Optimizer:
    """What checkpoint.save/load call of an optimizer. Not AdamW: its constructor imports torch._dynamo
    (~4 s on a 2-core box), the whole of this file's time budget."""

    def __init__(self):
        self.sd = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(3, 2)}},
                   "param_groups": [{"lr": 1e-2, "betas": (0.9, 0.999), "params": [0]}]}

    def state_dict(self):
        return self.sd

    def load_state_dict(self, sd):
        self.sd = sd


def _ckpt(tmp_path, best_score):
    params, opt = {"w": torch.nn.Parameter(torch.randn(3, 2))}, _Optimizer()
    state = {"step": 1, "best_score": best_score, "history": [{"auc": math.nan}]}
    checkpoint.save(tmp_path / "ckpt", params, opt, state)
    return params, opt


@pytest.mark.parametrize("name", ["ckpt.safetensors", "ckpt.json"])
def test_damaged_checkpoint(tmp_path, name):
    params, opt = _ckpt(tmp_path, -math.inf)
    text = (tmp_path / "ckpt" / "ckpt.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    restored = _Optimizer()
    restored.sd = None
    state, _ = checkpoint.load(tmp_path / "ckpt", params, restored)  # non-finite loop state comes back exactly
    assert state["best_score"] == -math.inf and math.isnan(state["history"][0]["auc"])
    assert torch.equal(restored.sd["state"][0]["exp_avg"], torch.ones(3, 2))
    assert restored.sd["param_groups"] == opt.sd["param_groups"]
    _truncate(tmp_path / "ckpt" / name)
    with pytest.raises(ArtifactError) as e:
        checkpoint.load(tmp_path / "ckpt", params, opt)
    _one_line(e, tmp_path / "ckpt" / name, f"delete {tmp_path / 'ckpt'}/ to restart the stage from its beginning")


# --- file modes and standard JSON

def test_written_files_get_the_umask_mode_not_mkstemp_0600(tmp_path):
    assert FILE_MODE == 0o666 & ~_read_umask()
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    with atomic_file(tmp_path / "b.npz") as f:
        np.savez(f, x=np.arange(3))
    for name in ("a.bin", "b.npz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == FILE_MODE
    code = "import sys; from thinkrec.io import write_json; write_json(sys.argv[1], {})"
    child = _python(tmp_path / "w.py", code, tmp_path / "c.json", umask=0o007)
    child.communicate()
    assert child.returncode == 0 and (tmp_path / "c.json").stat().st_mode & 0o777 == 0o660


def test_write_json_is_standard(tmp_path):
    write_json(tmp_path / "x.json", {"inf": math.inf, "nested": [-math.inf, math.nan, 1.5, (2, "é")]})
    text = (tmp_path / "x.json").read_text(encoding="utf-8")
    assert json.loads(text, parse_constant=pytest.fail) == {"inf": None, "nested": [None, None, 1.5, [2, "é"]]}


def test_expert_report_has_no_infinity(tmp_path):
    # users 0-2 like everything, users 3-5 nothing: the like rate has zero spread in each group -> d = inf
    rows = [(u, i, int(u < 3), 10 * u + i, 0) for u in range(6) for i in range(4)]
    prep = toy_prepared(rows)
    save_prepared(prep, tmp_path)
    emb = torch.tensor([[1.0, 0.1], [1.1, 0.0], [0.9, -0.1], [-1.0, 0.1], [-1.1, 0.0], [-0.9, -0.1]])
    atomic_write_bytes(tmp_path / "cf" / "mf.safetensors", st_save({"user_emb": emb, "item_emb": torch.zeros(4, 2)}))
    rep = build_groups(tmp_path, GroupConfig(groups=2))
    assert rep["cohens_d_like_rate"] == math.inf
    text = (tmp_path / "experts" / "report.json").read_text()
    saved = json.loads(text, parse_constant=pytest.fail)  # no Infinity / NaN tokens
    assert saved["cohens_d_like_rate"] is None and saved["group_sizes"] == [3, 3]


def test_run_config_is_typed_and_older_runs_read_back_as_values(tmp_path):
    """RUN/config.json keeps numbers, None and booleans as they are (no str(v) round trip); a run made before it
    has only metrics.json's strings, which RunDir.config reads back as the same values."""
    from pathlib import Path

    from thinkrec.rundir import RunDir

    args = {"lr": 1e-3, "epochs": 1.0, "batch_size": 8, "traces": None, "grad_ckpt": False, "experts": "auto",
            "run_dir": Path("runs/x"), "resume": True, "no_progress": True, "ckpt_minutes": 2.0}
    new, old = RunDir(tmp_path / "new"), RunDir(tmp_path / "old")
    new.path.mkdir()
    record = new.write_config(args)
    assert new.config() == record == {"lr": 1e-3, "epochs": 1.0, "batch_size": 8, "traces": None,
                                      "grad_ckpt": False, "experts": "auto", "run_dir": "runs/x"}
    old.path.mkdir()
    old.metrics.write_text(json.dumps({"args": {k: str(v) for k, v in record.items()}}))
    assert old.config() == record
    assert RunDir(tmp_path / "none").config() == {}
    new.config_path.write_text("{not json")
    with pytest.raises(ArtifactError, match="config.json"):
        new.config()


def test_every_error_about_the_users_side_is_one_type():
    """Each CLI prints a UserError (or a missing path) on one line and exits 2: every error class the project
    raises for bad input, files, runs or machines must be one, or a CLI would show a traceback for it."""
    from thinkrec.data import DataError
    from thinkrec.errors import USER_ERRORS, UsageError, UserError
    from thinkrec.experiments.runs import ExperimentError
    from thinkrec.experts import GroupError
    from thinkrec.hardware import PrecisionError
    from thinkrec.infer import RunError
    from thinkrec.io import ArtifactError, RunLockedError
    from thinkrec.model.adapters import AdapterFileError
    from thinkrec.model.load import ModelLoadError
    from thinkrec.reasoning.teacher import TeacherError
    from thinkrec.recipe import RecipeError
    from thinkrec.train.checkpoint import CheckpointError

    for cls in (DataError, ExperimentError, GroupError, PrecisionError, RunError, ArtifactError, RunLockedError,
                AdapterFileError, ModelLoadError, TeacherError, RecipeError, CheckpointError, UsageError):
        assert issubclass(cls, UserError), cls
    assert issubclass(DataError, ValueError) and issubclass(ModelLoadError, RuntimeError)  # old bases kept
    assert isinstance(FileNotFoundError("x"), USER_ERRORS) and not isinstance(KeyError("x"), USER_ERRORS)
    import train
    assert train.UsageError is UsageError
