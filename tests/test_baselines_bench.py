"""bench/baselines.py on a tiny csv: CoLLM's bias-free MF is a model of its own (no paper row, no bias parts),
and an unknown --models name is refused by name."""
import importlib.util
import sys
from pathlib import Path

import pytest

from tests.test_train_cli import _tiny_csv

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.append(str(BENCH))  # the bench scripts import their _util as when run from bench/; last, shadowing nothing
_spec = importlib.util.spec_from_file_location("_bench_baselines", BENCH / "baselines.py")
baselines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(baselines)


def test_bias_free_mf_scored_beside_the_floor_without_a_paper_row(tmp_path, capsys):
    out = baselines.main(["--data-dir", str(_tiny_csv(tmp_path)), "--models", "mf-nobias", "--max-epochs", "2"])
    assert set(out) == {"mf-nobias", "like-rate", "mf_parts"}
    assert 0.0 <= out["mf-nobias"]["auc"] <= 1.0
    assert out["mf_parts"] == {}  # the bias / dot split is MF's (with biases) only
    table = capsys.readouterr().out
    assert "mf-nobias ours" in table and "mf-nobias paper" not in table
    assert "where MF's signal sits" not in table


def test_unknown_model_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        baselines.parse(["--models", "mf,bpr"])
    assert "bpr not one of mf, lightgcn, sasrec, mf-nobias" in capsys.readouterr().err
