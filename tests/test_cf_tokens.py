"""What the CF tokens carry (thinkrec/model/projector.py): the bias column, standardised inputs and tokens that
start at a token embedding's norm and differ across users; a run trained with those levers scores the same
through infer.py; adapters saved before the levers load as raw-input projectors."""

import json

import pytest
import torch

from thinkrec.model.projector import CFProjector, cf_token_tables, token_report

pytest.importorskip("faiss")


def _mf_like(n_users=40, n_items=30, d=16, seed=0):
    """An MF export at MF's real scale: per-dimension std ~0.03 and biases of order 1."""
    g = torch.Generator().manual_seed(seed)
    return {"user_emb": 0.03 * torch.randn(n_users, d, generator=g), "item_emb": 0.025 * torch.randn(n_items, d, generator=g),
            "user_bias": torch.randn(n_users, generator=g), "item_bias": torch.randn(n_items, generator=g)}


def test_bias_column_is_appended_and_missing_biases_are_zero():
    cf = _mf_like()
    u, i = cf_token_tables(cf, "emb+bias")
    assert u.shape == (40, 17) and i.shape == (30, 17)
    assert torch.equal(u[:, -1], cf["user_bias"]) and torch.equal(i[:, :-1], cf["item_emb"])
    assert cf_token_tables(cf, "emb")[0] is cf["user_emb"]
    no_bias = {k: v for k, v in cf.items() if "bias" not in k}  # SASRec exports none
    assert torch.equal(cf_token_tables(no_bias, "emb+bias")[1][:, -1], torch.zeros(30))
    with pytest.raises(ValueError, match="expected one of"):
        cf_token_tables(cf, "bias")


def test_fitted_projector_starts_at_token_norm_and_separates_users():
    torch.manual_seed(0)
    tables = cf_token_tables(_mf_like(), "emb")  # the official inputs, at MF's scale
    raw = CFProjector(16, 64, mid=128)
    fitted = CFProjector(16, 64, mid=128)
    fitted.load_state_dict(raw.state_dict())
    fitted.fit_inputs(tables, target_norm=3.0)
    tokens = torch.randn(100, 64)  # stand-in token embeddings, median norm ~8
    before, after = (token_report(p, tables, tokens) for p in (raw, fitted))
    x = torch.cat(tables)
    with torch.no_grad():
        assert float(fitted(x).norm(dim=-1).mean()) == pytest.approx(3.0, rel=1e-4)
    z = (x - fitted.in_mean) / fitted.in_std
    assert z.mean(0).abs().max() < 1e-5 and (z.std(0) - 1).abs().max() < 1e-4
    # raw MF-scale inputs: every token is almost the output bias; fitted: they differ
    assert before["users"]["mean_pairwise_cosine"] > 0.95
    assert after["users"]["mean_pairwise_cosine"] < before["users"]["mean_pairwise_cosine"] - 0.2
    assert after["users"]["mean_norm"] == pytest.approx(3.0, rel=0.2)


def test_levers_train_and_infer_agree_and_are_recorded(tmp_path):
    import infer
    from tests.test_train_cli import train_tiny_run

    run = train_tiny_run(tmp_path, "--cf-inputs", "emb+bias", "--cf-scale", "held", "--cf-slots", "two",
                         "--train-prompt", "c3", "--stage2-lr", "1e-2", "--test-rows", "official",
                         "--stage-rows", "stage2=5")
    cfg = json.loads((run / "stage3" / "adapters.json").read_text())
    assert cfg["projector"]["inputs"] == "emb+bias" and cfg["projector"]["cf_dim"] == 9  # --cf-dim 8 + bias
    assert cfg["projector"]["slots"] == "two"
    saved = json.loads((run / "metrics.json").read_text())
    tokens = saved["stages"]["stage2"]["tokens"]
    assert set(tokens) == {"start", "end"} and tokens["start"]["users"]["norm_vs_tokens"] == pytest.approx(1.0, rel=0.3)
    # held: the trained tokens end at the norm they started at (lr 1e-2 would move a free one)
    assert tokens["end"]["items"]["mean_norm"] == pytest.approx(tokens["start"]["items"]["mean_norm"], rel=1e-3)
    assert saved["args"]["train_prompt"] == "c3" and saved["args"]["cf_scale"] == "held"
    assert saved["args"]["cf_slots"] == "two"
    # --stage-rows stage2=5: one batch of 5 in stage 2, the other stages' 12 rows in 3 batches
    assert [saved["stages"][st]["steps"] for st in ("stage1", "stage2", "stage3")] == [3, 1, 3]
    # RUN/config.json: the same record, typed, written when the run started
    from thinkrec.rundir import RunDir
    cfg = RunDir(run).config()
    assert cfg == saved["args"] and cfg["stage2_lr"] == 1e-2 and cfg["traces"] is None and "resume" not in cfg
    assert cfg["stage_rows"] == "stage2=5"

    # --test-rows official: the end scores the official 25% sample of the 20 test rows, and only it
    assert saved["test_rows"] == saved["test_official_sample"]["rows"] == 5
    assert {"cf", "like_rate"} <= saved["valid_baselines"].keys()
    m = infer.main(["--run-dir", str(run), "--out", str(tmp_path / "out"), "--no-progress", "--threads", "1"])
    # infer.py scores the same rows (the run's --test-rows) from the same CF token tables
    ours, theirs = ([json.loads(x) for x in (d / "scores.jsonl").read_text().splitlines()]
                    for d in (run / "infer", tmp_path / "out"))
    assert [x["row"] for x in ours] == [x["row"] for x in theirs] and m["rows"] == 5
    assert [x["score"] for x in ours] == pytest.approx([x["score"] for x in theirs], abs=1e-5)
    assert [x["like_rate_score"] for x in ours] == [x["like_rate_score"] for x in theirs]


def test_adapters_saved_before_standardisation_load_as_raw_inputs(tmp_path):
    from safetensors.torch import load_file, save_file

    from tests.train_fixtures import tiny_lm
    from thinkrec.model.adapters import WEIGHTS, load_adapters, save_adapters

    lm = tiny_lm(cf_dim=8)
    lm.projector.fit_inputs((torch.randn(5, 8), torch.randn(4, 8)), 2.0)
    save_adapters(lm, tmp_path)
    old = {k: v for k, v in load_file(tmp_path / WEIGHTS).items()
           if not k.startswith(("projector.in_", "projector.out_"))}
    save_file(old, tmp_path / WEIGHTS, metadata={"format": "thinkrec-lora"})
    load_adapters(lm, tmp_path)
    assert torch.equal(lm.projector.in_mean, torch.zeros(8)) and torch.equal(lm.projector.in_std, torch.ones(8))
    assert not lm.projector.held


def test_held_norm_survives_training_steps_and_a_save():
    """--cf-scale held: whatever the optimiser does, every token keeps the norm it was given, and the saved
    projector keeps holding it."""
    from tests.train_fixtures import tiny_lm
    from thinkrec.model.adapters import load_adapters, save_adapters

    torch.manual_seed(0)
    tables = cf_token_tables(_mf_like(d=8), "emb")
    p = CFProjector(8, 32, mid=64)
    p.fit_inputs(tables, target_norm=3.0)
    p.hold_norm(3.0)
    opt = torch.optim.AdamW(p.parameters(), lr=0.1)
    x = torch.cat(tables)
    for _ in range(5):  # a loss that wants big tokens: free, the norm would grow
        opt.zero_grad()
        (-p(x).pow(2).sum()).backward()
        opt.step()
    with torch.no_grad():
        assert torch.allclose(p(x).norm(dim=-1), torch.full((len(x),), 3.0), rtol=1e-4)
    p.hold_norm(0)
    with torch.no_grad():
        assert p(x).norm(dim=-1).mean() > 4.0  # the same weights, free: the loss did push the norm up

    import tempfile
    lm = tiny_lm(cf_dim=8)
    lm.projector.hold_norm(2.5)
    with tempfile.TemporaryDirectory() as d:
        save_adapters(lm, d)
        back = tiny_lm(cf_dim=8)
        load_adapters(back, d)
    assert back.projector.held and float(back.projector.out_norm) == 2.5


def test_stage1_adapters_load_into_a_model_whose_tokens_have_other_inputs(tmp_path):
    """Stage 1 never trains the projector: its saved (initial) projector is ignored, so a run with
    --cf-inputs emb+bias can start from a stage 1 made with emb (one more input column)."""
    from thinkrec.model.adapters import AdapterFileError, load_adapters, save_adapters
    from tests.train_fixtures import tiny_lm

    save_adapters(tiny_lm(cf_dim=8), tmp_path)
    wider = tiny_lm(cf_dim=9)
    before = {k: v.clone() for k, v in wider.projector.state_dict().items()}
    with pytest.raises(AdapterFileError, match="shapes differ"):
        load_adapters(wider, tmp_path)
    load_adapters(wider, tmp_path, projector=False)
    assert all(torch.equal(v, wider.projector.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("bad", ["stage9=3", "stage2", "stage2=-1", "stage2=many"])
def test_stage_rows_errors_name_the_argument(bad, capsys):
    import train

    with pytest.raises(SystemExit) as e:
        train.parse(["--stage-rows", bad])
    assert e.value.code == 2 and "--stage-rows" in capsys.readouterr().err


def test_ours_carries_the_levers_and_older_runs_keep_the_points_they_started_with(tmp_path):
    """The CF-token points of ours are the levers measured on valid rows; a run recorded before they changed
    (RUN/recipe.json with the old points, or without cf_slots at all) resumes and scores with its own."""
    from thinkrec import recipe as recipes

    new = recipes.for_run(tmp_path / "new", None)
    assert (new.cf_inputs, new.cf_scale, new.cf_slots, new.train_prompt) == ("emb+bias", "held", "two", "c3")
    official = recipes.get("official")
    assert (official.cf_inputs, official.cf_scale, official.cf_slots, official.train_prompt) == ("emb", "none", "all", "ids")
    old = tmp_path / "old"
    old.mkdir()
    points = {k: v for k, v in recipes.OURS.to_dict().items() if k != "cf_slots"}
    points.update(cf_inputs="emb", cf_scale="none", train_prompt="ids")
    (old / recipes.RUN_FILE).write_text(json.dumps(points))
    kept = recipes.for_run(old, None)
    assert (kept.cf_inputs, kept.cf_scale, kept.cf_slots, kept.train_prompt) == ("emb", "none", "all", "ids")
    assert recipes.for_run(tmp_path / "o", "official").stages == recipes.OFFICIAL.stages
    recipes.record(tmp_path / "o", recipes.OFFICIAL)
    assert recipes.for_run(tmp_path / "o", None) == recipes.OFFICIAL  # the schedules read back as Schedule
