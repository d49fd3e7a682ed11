"""The loop: resume after a kill equals an uninterrupted run (bit for bit on CPU), mixed sampling uses
both sets, best-model selection, and two gloo ranks equal one process at the same global batch."""

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.train_fixtures import PAD, sample_set, tiny_lm
from thinkrec.train import checkpoint
from thinkrec.train.ddp import Dist
from thinkrec.train.loop import LoopConfig, StageInputs, lr_at, train_stage


def _inputs(n=40, traces=True):
    return StageInputs(plain=sample_set(n, seed=1), valid=sample_set(12, seed=2),
                       reasoning=sample_set(16, seed=4, traces=True) if traces else None, pad_id=PAD)


def _trainable(lm):
    return {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}


def _cfg(**kw):
    base = dict(epochs=1.0, batch_size=5, accum=2, lr=5e-3, warmup=2, eval_every=2, reason_prob=0.3, seed=7,
                progress=False, min_lr_ratio=0.1)
    return LoopConfig(**{**base, **kw})


def _model():
    lm = tiny_lm(layers=2, n_experts=1, dropout=0.1)  # dropout: the RNG state must be restored too
    lm.set_trainable(adapters=[0])
    return lm


class Killed(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    torch.manual_seed(0)
    lm_a = _model()
    ra = train_stage(lm_a, _inputs(), _cfg(), tmp_path / "a", log=lambda *_: None)
    torch.manual_seed(0)
    lm_b = _model()
    saved = []
    real_save = checkpoint.save

    def save_then_die(*a, **kw):  # the process dies right after its first checkpoint (step 2's evaluation)
        real_save(*a, **kw)
        saved.append(a[3]["step"])
        raise Killed

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        train_stage(lm_b, _inputs(), _cfg(), tmp_path / "b", log=lambda *_: None)
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert saved == [2] and checkpoint.exists(tmp_path / "b")
    torch.manual_seed(123)  # a fresh process: different RNG, untrained weights
    lm_c = _model()
    rc = train_stage(lm_c, _inputs(), _cfg(), tmp_path / "b", log=lambda *_: None)
    assert rc["state"].step == ra["state"].step
    assert [h["criterion"] for h in rc["state"].history] == [h["criterion"] for h in ra["state"].history]
    a, c = _trainable(lm_a), _trainable(lm_c)
    assert a.keys() == c.keys()
    for n in a:
        assert torch.equal(a[n], c[n]), n
    assert ra["state"].cursors["reason"] != [0, 0]  # the reasoning set was drawn from


def test_stage3_resume_with_prefix_cache_equals_uninterrupted(tmp_path, monkeypatch):
    """Stage 3 over 3 epochs with the frozen prefix cached: a run killed in epoch 2 restarts with an empty
    cache, and its replay must refill it with the same bits (batched rows differ in the last bits from
    the same rows in other batches)."""
    from thinkrec.experts import one_hot_experts
    from thinkrec.train import stages

    def run(ckpt, kill_after=None):
        torch.manual_seed(0)
        lm = tiny_lm(layers=3, n_experts=2, cf_dim=5, dropout=0.1)
        prefix = stages.setup(lm, "stage3", expert_layers=1, prefix_cache_mb=1.0)
        groups = torch.arange(6) % 2
        g = torch.Generator().manual_seed(3)
        inputs = StageInputs(plain=sample_set(20, ids=True, seed=1), valid=sample_set(8, ids=True, seed=2),
                             route=lambda users: one_hot_experts(groups[users], 2), user_emb=torch.randn(6, 5, generator=g),
                             item_emb=torch.randn(11, 5, generator=g), prefix=prefix, pad_id=PAD)
        cfg = _cfg(epochs=3.0, accum=1, eval_every=0, ckpt_every=1, reason_prob=0.0)
        if kill_after is not None:
            real_save, saves = checkpoint.save, []

            def save_then_die(*a, **kw):
                real_save(*a, **kw)
                saves.append(1)
                if len(saves) == kill_after:
                    raise Killed
            monkeypatch.setattr(checkpoint, "save", save_then_die)
            with pytest.raises(Killed):
                train_stage(lm, inputs, cfg, ckpt, log=lambda *_: None)
            monkeypatch.setattr(checkpoint, "save", real_save)
            return run(ckpt)
        res = train_stage(lm, inputs, cfg, ckpt, log=lambda *_: None)
        return _trainable(lm), prefix, res

    want, prefix_a, _ = run(tmp_path / "a")
    got, prefix_b, res = run(tmp_path / "b", kill_after=6)  # 4 batches an epoch: killed in epoch 2
    assert prefix_a.hits > 0 and prefix_b.hits > 0 and prefix_b.cache.keys() == prefix_a.cache.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_best_parameters_are_restored(tmp_path):
    torch.manual_seed(0)
    lm = _model()
    res = train_stage(lm, _inputs(traces=False), _cfg(lr=5e-2, eval_every=1), None, log=lambda *_: None)
    st = res["state"]
    scores = [h["criterion"] for h in st.history]
    assert st.best_score == max(scores) and st.best_step == st.history[int(np.argmax(scores))]["step"]
    for n, p in lm.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, res["best"][n])


def test_per_group_selection_keeps_each_experts_own_best(monkeypatch):
    """valid_groups: expert 1 keeps the parameters of the evaluation where group 1's rows scored best, expert 2
    those where group 2's did, though the joint criterion peaks elsewhere; the stage goes on while any
    group improves."""
    from thinkrec.train import loop

    torch.manual_seed(0)
    lm = tiny_lm(layers=2, n_experts=2)
    lm.set_trainable(adapters=[1, 2])
    inputs = _inputs(traces=False)
    v = inputs.valid
    groups = np.where(np.arange(len(v)) % 2 == 0, 1, 2)
    labels = v.labels.astype(float)
    best_at = {1: 2, 2: 4}  # evaluation number where each group's rows are ranked perfectly
    snaps, n_eval = [], [0]

    def scripted(lm_, sset, *a, **kw):
        n_eval[0] += 1
        snaps.append(_trainable(lm_))
        out = np.empty(len(sset))
        for g in (1, 2):
            sel = groups == g
            good = n_eval[0] == best_at[g]
            out[sel] = (labels[sel] if good else 1 - labels[sel]) + 0.01 * np.arange(sel.sum())
        return out

    monkeypatch.setattr(loop, "score", scripted)
    inputs.valid_groups = groups
    res = train_stage(lm, inputs, _cfg(lr=5e-2, eval_every=1, accum=1, patience=3), None, log=lambda *_: None)
    st = res["state"]
    assert n_eval[0] >= 5 and {g: step for g, (_, step) in st.group_best.items()} == {
        "1": st.history[1]["step"], "2": st.history[3]["step"]}
    for n, p in lm.named_parameters():
        if p.requires_grad:
            g = loop.adapter_of(n)
            assert torch.equal(p, snaps[best_at[g] - 1][n]), n  # expert g from its own best evaluation
    assert not torch.equal(snaps[1][next(n for n in snaps[1] if loop.adapter_of(n) == 1)],
                           snaps[3][next(n for n in snaps[3] if loop.adapter_of(n) == 1)])  # they did move


def test_lr_schedule():
    cfg = LoopConfig(lr=1.0, warmup=4, min_lr_ratio=0.5)
    lrs = [lr_at(t, 100, cfg) for t in range(100)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and abs(lrs[-1] - 0.5) < 1e-3 and all(np.diff(lrs[4:]) <= 0)


def test_official_lr_schedule_and_epochs():
    """The official configs: warmup from warmup_lr, cosine to an absolute min_lr (stage 3's is above its lr,
    so the rate rises), and an epoch of iters_per_epoch micro-batches."""
    cfg = LoopConfig(lr=1e-5, min_lr=8e-5, warmup_lr=1e-6, warmup=4)
    lrs = [lr_at(t, 100, cfg) for t in range(100)]
    assert np.allclose(lrs[:5], [1e-6, 3.25e-6, 5.5e-6, 7.75e-6, 1e-5]) and abs(lrs[-1] - 8e-5) < 1e-7
    assert all(np.diff(lrs[4:]) >= 0)
    torch.manual_seed(0)
    res = train_stage(_model(), _inputs(traces=False), _cfg(iters_per_epoch=3, epochs=2.0, accum=1, eval_every=0),
                      None, log=lambda *_: None)
    assert res["state"].micro == 6 and res["state"].step == 6  # 2 epochs x 3 micro-batches, not passes over 40 rows


@pytest.mark.parametrize("stop,evals", [("criterion", 3), ("any", 6)])
def test_early_stopping_rules(monkeypatch, stop, evals):
    """The criterion peaks at the first evaluation; AUC alone improves at the third. Ours stops after
    `patience` evaluations without a better criterion; the official rule resets its counter when AUC, UAUC
    or the criterion improves and stops after MORE than `patience` evaluations without."""
    from thinkrec.train import loop

    metrics = iter([{"auc": 0.70, "uauc": 0.60}, {"auc": 0.60, "uauc": 0.50}, {"auc": 0.71, "uauc": 0.30}]
                   + [{"auc": 0.50, "uauc": 0.50}] * 20)
    monkeypatch.setattr(loop, "score", lambda lm_, sset, *a, **kw: np.zeros(len(sset)))
    monkeypatch.setattr(loop, "evaluate", lambda *a, **kw: dict(next(metrics)))
    torch.manual_seed(0)
    res = train_stage(_model(), _inputs(traces=False), _cfg(accum=1, eval_every=1, patience=2, stop=stop, epochs=3.0),
                      None, log=lambda *_: None)
    assert len(res["state"].history) == evals and res["state"].best_step == res["state"].history[0]["step"]


def _ddp_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lm = tiny_lm(layers=2, n_experts=1)
    lm.set_trainable(adapters=[0])
    train_stage(lm, _inputs(n=21, traces=False), _cfg(batch_size=7, accum=1, eval_every=0, epochs=1.0), None,
                d=Dist(rank, world), log=lambda *_: None)
    if rank == 0:
        from safetensors.torch import save_file
        save_file({n: p.contiguous() for n, p in _trainable(lm).items()}, os.path.join(out_dir, "ddp.safetensors"))
    torch.distributed.destroy_process_group()



def test_two_gloo_ranks_equal_one_process(tmp_path):
    from safetensors.torch import load_file

    # fork, not spawn: the children inherit the imported torch + transformers (a spawn re-imports them,
    # ~20 s per process on a busy 2-core machine)
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    _assert_equals_one_process(load_file(str(tmp_path / "ddp.safetensors")))


def _assert_equals_one_process(ddp: dict) -> None:
    torch.manual_seed(0)
    lm = tiny_lm(layers=2, n_experts=1)
    lm.set_trainable(adapters=[0])
    before = _trainable(lm)
    train_stage(lm, _inputs(n=21, traces=False), _cfg(batch_size=7, accum=1, eval_every=0, epochs=1.0), None,
                log=lambda *_: None)
    one = _trainable(lm)
    assert ddp.keys() == one.keys() and any(not torch.equal(one[n], before[n]) for n in one)  # it trained
    for n in one:  # 7 rows split 3 + 4: shard losses still sum to the batch loss
        torch.testing.assert_close(ddp[n], one[n], atol=1e-6, rtol=1e-5, msg=n)


def test_torchrun_launch_equals_one_process(tmp_path):
    """A real `torchrun --standalone --nproc-per-node 2` launch: ranks join from the environment as in train.py."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "torchrun.safetensors"
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(root, "tests", "torchrun_worker.py"), str(out)]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_equals_one_process(load_file(str(out)))
