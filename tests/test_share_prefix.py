"""Training rows that share a prompt prefix (rows of one user with one history): the collate step finds
them, the sampler draws them together, and the padding-free forward computes the shared tokens once with
the same values and gradients as computing every row whole."""

import json

import numpy as np
import pytest
import torch

from tests.test_model_packed import _tiny
from tests.train_fixtures import ITEM_PH, NO, PAD, USER_PH, YES, FakeBuilder, tiny_lm
from tests.tiny_llama import VOCAB
from thinkrec.batches import MIN_SHARED, cf_inputs, collate
from thinkrec.data.sampler import LengthBucketSampler
from thinkrec.data.tokenize import Sample
from thinkrec.model.packed import Packing
from thinkrec.train.data import SampleSet
from thinkrec.train.loop import LoopConfig, StageInputs, train_stage
from thinkrec.train.losses import batch_loss, loss_positions


class SharedBuilder(FakeBuilder):
    """Rows in groups of `size` (one user each): a group's prompts share their first 20-29 tokens (a CF item
    slot and the user slot among them), then each row has its own 3-8 tokens with a target item slot."""

    def __init__(self, n_rows=48, size=3, seed=0):
        super().__init__(n_rows, ids=True, seed=seed)
        self.size = size
        group = np.arange(n_rows) // size
        self.prep.inter.user = group % 5  # one user per group (users repeat across groups)
        self.hist = group[:, None]  # what prefix_groups reads: one history per group

    def sample(self, row, trace=None):
        g = int(row) // self.size
        rng = np.random.default_rng([self.seed, 1000 + g])
        head = rng.integers(10, VOCAB, int(rng.integers(20, 30)))
        head[[2, len(head) - 1]] = [ITEM_PH, USER_PH]
        own_rng = np.random.default_rng([self.seed, int(row)])
        own = own_rng.integers(10, VOCAB, int(own_rng.integers(3, 9)))
        own[0] = ITEM_PH
        ids = np.concatenate([head, own]).astype(np.int64)
        ph_pos = np.array([2, len(head) - 1, len(head)], dtype=np.int64)
        index = np.array([int(rng.integers(0, self.n_items)), int(self.prep.inter.user[row]),
                          int(own_rng.integers(0, self.n_items))])
        label = int(self.prep.inter.label[row])
        ans = np.array([YES if label else NO]) if trace is None else \
            np.concatenate([[YES if label else NO], own_rng.integers(10, VOCAB, len(trace))])
        return Sample(ids, ans.astype(np.int64), ph_pos, np.array([1, 0, 1], np.int8), index, label, int(row), 0)


def _tables(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=g), torch.randn(11, 5, generator=g)


def test_collate_shares_prefixes_of_one_user_only():
    b = SharedBuilder()
    rows = [0, 1, 2, 3, 6]  # group 0 (rows 0-2), row 3 (group 1, another user), row 6 (group 2)
    samples = [b.sample(r) for r in rows]
    users = b.prep.inter.user[rows]
    batch = collate(samples, users, PAD, share=True)
    n = batch.share_len.tolist()
    assert batch.share_lead.tolist()[:3] == [0, 0, 0] and n[0] == 0 and min(n[1:3]) >= MIN_SHARED
    assert n[3] == 0 and n[4] == 0  # other histories: nothing shared
    # row 1 and 2 share the group's head exactly (the first own token is a CF slot of another item)
    assert n[1:3] == [int(s.ph_pos[2]) for s in samples[1:3]]  # the group's head: its own slot comes next
    # the slots in shared positions are left out: the rows' own slots remain, in row-major order
    assert len(batch.ph_kind) == 3 + 1 + 1 + 3 + 3
    plain = collate(samples, users, PAD)
    assert plain.share is None and len(plain.ph_kind) == 15
    # the same tokens for another user are not shared: its CF user slot differs
    other = collate(samples[:2], [users[0], users[0] + 1], PAD, share=True)
    assert other.share is None


def _grads(lm, b, cf, w, share):
    lm.zero_grad(set_to_none=True)
    h = lm(b.input_ids, b.attention_mask, cf_embeds=cf, placeholder_mask=b.ph_mask, select=loss_positions(b),
           expert_weights=w, share=share)
    loss = batch_loss(h, lm.lm_head_weight, YES, b)[0]
    loss.backward()
    return h.detach(), loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_shared_prefix_forward_and_gradients_match_whole_rows(kind):
    lm = _tiny(kind)
    lm.set_trainable(layers=None, adapters=None, projector=True)
    b = SharedBuilder(seed=1)
    rows = [0, 1, 2, 3, 4, 9, 12, 13]
    samples = [b.sample(r) for r in rows]
    users = b.prep.inter.user[rows]
    whole, shared = collate(samples, users, PAD), collate(samples, users, PAD, share=True)
    assert int((shared.share_len > 0).sum()) == 4  # rows 1, 2 (group 0), 4 (group 1), 13 (group 4)
    ue, ie = _tables()
    w = torch.softmax(torch.randn(len(rows), lm.n_adapters, generator=torch.Generator().manual_seed(2)), -1)
    # one route per user, as training gives (a group's rows are one user)
    w = w[torch.as_tensor([list(users).index(u) for u in users])]
    h0, loss0, g0 = _grads(lm, whole, cf_inputs(whole, ue, ie), w, None)
    h1, loss1, g1 = _grads(lm, shared, cf_inputs(shared, ue, ie), w, shared.share)
    torch.testing.assert_close(h1, h0, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=1e-5)
    assert g0.keys() == g1.keys() and any("projector" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4, msg=n)
    with torch.no_grad():  # the full grid too: shared positions repeat the lead row's states
        full0 = lm(whole.input_ids, whole.attention_mask, cf_embeds=cf_inputs(whole, ue, ie),
                   placeholder_mask=whole.ph_mask, expert_weights=w)
        full1 = lm(shared.input_ids, shared.attention_mask, cf_embeds=cf_inputs(shared, ue, ie),
                   placeholder_mask=shared.ph_mask, expert_weights=w, share=shared.share)
    m = whole.attention_mask.bool()
    torch.testing.assert_close(full1[m], full0[m], atol=2e-5, rtol=1e-4)
    assert torch.count_nonzero(full1[~m]) == 0


def test_packing_counts_shared_tokens_once_and_checks_its_input():
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    pk = Packing.from_mask(mask, (torch.tensor([0, 0, 2]), torch.tensor([0, 3, 0])))
    assert len(pk.flat) == 4 + 2 + 3 and pk.pos.tolist() == [0, 1, 2, 3, 3, 4, 0, 1, 2]
    # row 1's positions 0..2 are row 0's tokens: grid cols 0..2 of row 1 map to row 0's packed 0..2
    assert pk.grid.view(3, 5)[1].tolist() == [0, 1, 2, 4, 5]
    assert pk.index(torch.tensor([1]), torch.tensor([2])).item() == 2
    with pytest.raises(ValueError, match="lead row shares"):
        Packing.from_mask(mask, (torch.tensor([0, 0, 1]), torch.tensor([0, 3, 2])))
    with pytest.raises(ValueError, match="longer"):
        Packing.from_mask(mask, (torch.tensor([0, 0, 2]), torch.tensor([0, 5, 0])))
    assert Packing.from_mask(mask, (torch.arange(3), torch.zeros(3, dtype=torch.long))).gather is None


def test_sampler_keeps_group_mates_together_and_draws_every_row_once():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), rng.integers(1, 4, 40))
    lengths = rng.integers(20, 60, len(groups))
    s = LengthBucketSampler(lengths, 8, seed=3, groups=groups)
    s.set_epoch(1)
    batches = s.batches()
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(groups)))
    # a group's rows are adjacent in the pool order: at most one batch boundary splits a group
    where = {int(i): k for k, b in enumerate(batches) for i in b}
    for g in np.unique(groups):
        ks = {where[int(i)] for i in np.flatnonzero(groups == g)}
        assert len(ks) <= 2
    together = sum(len({where[int(i)] for i in np.flatnonzero(groups == g)}) == 1
                   for g in np.unique(groups) if (groups == g).sum() > 1)
    assert together >= 0.7 * sum((groups == g).sum() > 1 for g in np.unique(groups))
    s2 = LengthBucketSampler(lengths, 8, seed=3, groups=groups)
    s2.set_epoch(1)
    assert s2.batches() == batches  # deterministic per (seed, epoch)


def test_training_with_shared_prefixes_equals_training_on_whole_rows(monkeypatch):
    """The same grouped batch order with and without computing the prefix once: the same losses."""
    import thinkrec.train.loop as loop

    def run(share_tokens):
        torch.manual_seed(0)
        lm = tiny_lm(layers=2, n_experts=0, cf_dim=5)
        lm.set_trainable(projector=True)
        ue, ie = _tables(3)
        inputs = StageInputs(plain=SampleSet(SharedBuilder(seed=2), np.arange(48)), user_emb=ue, item_emb=ie,
                             pad_id=PAD)
        seen = []
        real = loop.collate

        def spy(*a, **kw):
            kw["share"] = kw.get("share") and share_tokens
            batch = real(*a, **kw)
            seen.append(batch.share is not None)
            return batch
        monkeypatch.setattr(loop, "collate", spy)
        res = train_stage(lm, inputs, LoopConfig(epochs=1, batch_size=6, lr=1e-3, progress=False,
                                                 share_prefix=True), log=lambda *_: None)
        trained = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
        return trained, res["state"].step, seen

    p1, steps1, seen1 = run(True)
    p0, steps0, seen0 = run(False)
    assert steps1 == steps0 == 8 and sum(seen1) >= len(seen1) // 2 and not any(seen0)  # most batches share
    assert any("projector" in n for n in p0) and any("lora_A" in n for n in p0)
    start = {n: p for n, p in tiny_lm(layers=2, n_experts=0, cf_dim=5).named_parameters() if n in p0}
    assert any(not torch.equal(p0[n], start[n]) for n in p0 if "lora" in n)  # training moved the adapters
    for n in p0:
        torch.testing.assert_close(p1[n], p0[n], atol=1e-5, rtol=1e-4, msg=n)


def test_train_cli_share_prefix_draws_shared_batches(tmp_path, monkeypatch):
    """train.py --share-prefix: rows rated in the same second are drawn together and their prefix shared."""
    pytest.importorskip("faiss")
    import train
    import thinkrec.train.loop as loop
    from tests.test_train_cli import _tiny_csv, _tiny_model_dir

    data = tmp_path / "data"
    data.mkdir()
    _tiny_csv(data)
    lines = (data / "interactions.csv").read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    for r in rows:  # pairs of a user's training rows rated in the same second
        if r[4] == "train":
            r[3] = str(int(r[3]) // 20 * 20)
    (data / "interactions.csv").write_text("\n".join([lines[0]] + [",".join(r) for r in rows]) + "\n")
    shared, real = [], loop.collate

    def spy(*a, **kw):
        batch = real(*a, **kw)
        shared.append(batch.share is not None)
        return batch
    monkeypatch.setattr(loop, "collate", spy)
    run = tmp_path / "run"
    train.main(["--dataset", "csv", "--data-dir", str(data), "--model", str(_tiny_model_dir(tmp_path / "model")),
                    "--run-dir", str(run), "--experts", "2", "--max-train-samples", "0", "--max-eval-samples", "8",
                    "--max-test-samples", "8", "--batch-size", "8", "--cf-dim", "8", "--expert-layers", "1",
                    "--max-len", "400", "--no-progress", "--threads", "1", "--share-prefix", "--last-stage", "stage2"])
    assert sum(shared) >= len(shared) // 2, shared  # most batches hold a same-second pair
    assert json.loads((run / "config.json").read_text())["share_prefix"] is True
