"""train.py end to end on a tiny random Llama and a tiny csv dataset: every phase writes its artifact,
metrics.json has the test metrics and routing counts, and a rerun skips every stage with the same result."""

import json

import numpy as np
import pytest

from tests.data_fixtures import tiny_tokenizer

pytest.importorskip("faiss")


def _tiny_model_dir(path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _tiny_csv(path, n_users=10, per_user=12):
    rng = np.random.default_rng(0)
    rows = ["user_id,item_id,label,timestamp,split"]
    for u in range(1, n_users + 1):
        for k in range(per_user):
            split = "train" if k < per_user - 4 else ("valid" if k < per_user - 2 else "test")
            rows.append(f"{u},{rng.integers(1, 16)},{rng.integers(0, 2)},{1000 * u + 10 * k},{split}")
    (path / "interactions.csv").write_text("\n".join(rows) + "\n")
    items = ["item_id,title,description"] + [f'{i},"Movie {i} (199{i % 10})",Comedy' for i in range(1, 16)]
    (path / "items.csv").write_text("\n".join(items) + "\n")
    return path


def test_train_cli_end_to_end_and_rerun_skips(tmp_path, capsys):
    import train

    model = _tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    _tiny_csv(data)
    run = tmp_path / "run"
    argv = ["--dataset", "csv", "--data-dir", str(data), "--model", str(model), "--run-dir", str(run),
            "--experts", "2", "--max-train-samples", "12", "--max-eval-samples", "8", "--max-test-samples", "10",
            "--batch-size", "5", "--cf-dim", "8", "--expert-layers", "1", "--max-len", "400", "--lr", "1e-3",
            "--no-progress", "--threads", "1"]
    m1 = train.main(argv)
    for f in ("data/stats.json", "cf/mf.safetensors", "experts/groups.safetensors", "stage1/adapters.json",
              "stage2/adapters.json", "stage3/adapters.json", "metrics.json"):
        assert (run / f).is_file(), f
    saved = json.loads((run / "metrics.json").read_text())
    assert {"auc", "uauc", "ndcg@5", "map@5"} <= saved["test"].keys()
    assert sum(saved["routing"].values()) == saved["test_rows"] == 10
    assert all(saved["stages"][s]["steps"] == 3 for s in ("stage1", "stage2", "stage3"))  # ceil(12 / 5)
    capsys.readouterr()
    m2 = train.main(argv)
    out = capsys.readouterr().out
    assert all(f"[{s}] {run / s} exists: loaded, skipped" in out for s in ("stage1", "stage2", "stage3"))
    assert m2["test"] == m1["test"]
