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


def train_tiny_run(base, *extra):
    """A finished train.py run on the tiny model and dataset under `base` (every test row scored)."""
    import train

    model = _tiny_model_dir(base / "model")
    data = base / "data"
    data.mkdir()
    _tiny_csv(data)
    run = base / "run"
    train.main(["--dataset", "csv", "--data-dir", str(data), "--model", str(model), "--run-dir", str(run),
                "--experts", "2", "--max-train-samples", "12", "--max-eval-samples", "8", "--max-test-samples", "0",
                "--batch-size", "5", "--cf-dim", "8", "--expert-layers", "1", "--max-len", "400", "--lr", "3e-2",
                "--no-progress", "--threads", "1", *extra])
    return run


@pytest.mark.smoke
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


def test_degenerate_groups_stop_before_training(tmp_path):
    import train

    model = _tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    _tiny_csv(data)
    run = tmp_path / "run"
    argv = ["--dataset", "csv", "--data-dir", str(data), "--model", str(model), "--run-dir", str(run),
            "--cf-dim", "8", "--no-progress", "--threads", "1"]
    with pytest.raises(train.UsageError, match=r"groups have \[\d+, \d+\] training users; group \d: \d users "
                                               r"\(\d+\.\d%\), under --min-group-share 45%.*--allow-small-groups"):
        train.main(argv + ["--experts", "2", "--min-group-share", "0.45"])
    assert not (run / "stage1").exists()
    report = json.loads((run / "experts" / "report.json").read_text())
    assert report["small_groups"] and sum(report["group_sizes"]) == 10 and -1 <= report["silhouette"] <= 1
    assert set(report["routing_by_split"]) == {"train", "valid", "test"}
    with pytest.raises(train.UsageError, match="holds 2 groups but --experts is 3"):
        train.main(argv + ["--experts", "3"])
    # --experts auto: the N with the best silhouette among groupings whose groups all reach the share
    import shutil

    from thinkrec.experts import GroupConfig, build_groups, load_groups

    shutil.rmtree(run / "experts")
    rep = build_groups(run, GroupConfig(groups=0, max_groups=4, min_share=0.1))
    n = len(load_groups(run)["centroids"])
    assert sorted(rep["silhouette_by_n"]) == [2, 3, 4]
    assert len(rep["group_sizes"]) == n and min(rep["group_sizes"]) >= 1
    assert rep["silhouette"] == pytest.approx(rep["silhouette_by_n"][n], abs=1e-4)


def test_selection_scores_valid_rows_with_the_c3_prompt(tmp_path, monkeypatch):
    """Every stage selects on the paper's C.3 prompt (what the evaluation scores): with CF ids in stages 2
    and 3, without them in stage 1, which knows none."""
    from thinkrec.train import loop

    seen = []
    real = loop.score

    def recording(lm, sset, *a, **kw):
        seen.append((kw.get("desc") or a[-1], sset.builder.mode, sset.builder.with_ids, sset.builder.max_len))
        return real(lm, sset, *a, **kw)

    monkeypatch.setattr(loop, "score", recording)
    train_tiny_run(tmp_path)
    by_stage = {desc.split()[0]: (mode, ids, max_len) for desc, mode, ids, max_len in seen}
    # ours puts CF tokens on the user and the target only (TWO_SLOTS); --recipe official on every item
    assert by_stage == {"stage1": ("reason", False, 809), "stage2": ("reason", "two", 809),
                        "stage3": ("reason", "two", 809)}


def test_stage3_group_selection_tracks_each_group(tmp_path):
    """--stage3-select group: stage 3's evaluations carry each group's criterion and train.json keeps them."""
    run = train_tiny_run(tmp_path, "--stage3-select", "group", "--eval-every", "1")
    info = json.loads((run / "stage3" / "train.json").read_text())
    assert all(set(h["groups"]) == {"1", "2"} for h in info["history"])
    assert all("groups" not in h for s in ("stage1", "stage2")
               for h in json.loads((run / s / "train.json").read_text())["history"])


def test_official_recipe_switches_every_point(tmp_path, monkeypatch):
    """--recipe official: verbatim prompts and answer tokens, the file history rule, no-year titles, Ward over
    all users, stage 3 on the stage-1 prompt with per-group selection, the official schedule and stopping
    rule, validation on the official 25% sample; the run keeps its recipe and refuses another."""
    import train
    from thinkrec.data import load_prepared
    from thinkrec.infer import load_run
    from thinkrec.infer.rows import official_sample
    from thinkrec.recipe import RecipeError

    seen = {}
    real = train.train_stage

    def recording(lm, inputs, cfg, *a, **kw):
        b = inputs.plain.builder
        seen[cfg.desc] = dict(mode=b.mode, style=b.style, history=b.history_rule, yes=lm.yes_token_id,
                              valid=inputs.valid.rows.tolist(), select=inputs.valid_groups is not None,
                              sched=(cfg.lr, cfg.min_lr, cfg.warmup_lr, cfg.stop, cfg.iters_per_epoch, cfg.eval_every))
        return real(lm, inputs, cfg, *a, **kw)

    monkeypatch.setattr(train, "train_stage", recording)
    run = train_tiny_run(tmp_path, "--recipe", "official", "--iters-per-epoch", "2", "--lr", "1e-3")
    assert json.loads((run / "recipe.json").read_text())["name"] == "official"
    args = json.loads((run / "metrics.json").read_text())["args"]
    assert (args["recipe"], args["history"], args["titles"], args["cluster"], args["stage3_select"]) == (
        "official", "file", "no-year", "ward", "group")
    report = json.loads((run / "experts" / "report.json").read_text())
    assert report["args"]["users"] == "all" and report["args"]["cluster"] == "ward"
    assert sum(report["group_sizes"]) == 10  # every user of the tiny data, not only those with training rows
    assert {s: (v["mode"], v["style"], v["history"]) for s, v in seen.items()} == {
        "stage1": ("text", "official", "file"), "stage2": ("ids", "official", "file"),
        "stage3": ("text", "official", "file")}
    tok = load_run(run).tok
    assert {v["yes"] for v in seen.values()} == {tok.convert_tokens_to_ids("Yes")}
    assert seen["stage1"]["sched"] == (1e-3, 8e-5, 1e-5, "any", 2, 2)  # --lr wins over the recipe's 1e-4
    assert seen["stage3"]["sched"] == (1e-5, 8e-5, 1e-6, "any", 2, 2)  # stage 3's own rates (--stage3-lr sets them)
    assert seen["stage3"]["select"] and not seen["stage2"]["select"]
    prep = load_prepared(run)
    assert set(seen["stage1"]["valid"]) <= set(official_sample(prep, None, "valid").tolist())
    loaded = load_run(run)
    assert loaded.style == "official" and loaded.history == "file" and loaded.titles == "no-year"
    assert loaded.builder("reason").text(0).startswith("<s>#Question: A user has given high ratings")
    with pytest.raises(RecipeError, match="started with --recipe official"):
        train.main(["--run-dir", str(run), "--recipe", "ours"])


def test_no_progress_silences_every_bar(tmp_path, capsys):
    """--no-progress: no tqdm bar on stderr from any phase, the CF model's grid included."""
    import train

    model = _tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    _tiny_csv(data)
    capsys.readouterr()
    train.main(["--dataset", "csv", "--data-dir", str(data), "--model", str(model), "--run-dir", str(tmp_path / "run"),
                "--experts", "2", "--max-train-samples", "12", "--max-eval-samples", "8", "--max-test-samples", "4",
                "--batch-size", "5", "--cf-dim", "8", "--expert-layers", "1", "--max-len", "400", "--no-progress",
                "--threads", "1"])
    err = capsys.readouterr().err
    assert "it/s" not in err and "s/it" not in err and "%|" not in err, err[-2000:]
