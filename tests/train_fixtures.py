"""Shared pieces of the training tests: a tiny ThinkRecLM and a fake prompt builder (random token ids)."""

import numpy as np
import torch

from tests.tiny_llama import VOCAB, tiny_llama
from thinkrec.data.tokenize import Sample
from thinkrec.model import LoRAConfig, ThinkRecLM
from thinkrec.train.data import SampleSet

YES, NO, PAD, USER_PH, ITEM_PH = 7, 9, 0, VOCAB, VOCAB + 1  # placeholders lie past the vocabulary


def tiny_lm(layers=3, n_experts=2, dropout=0.0, cf_dim=None, seed=0) -> ThinkRecLM:
    lm = ThinkRecLM(tiny_llama(seed=seed, layers=layers), n_experts=n_experts,
                    lora=LoRAConfig(r=4, alpha=8.0, dropout=dropout), cf_dim=cf_dim, projector_mid=24,
                    yes_token_id=YES, no_token_id=NO,
                    placeholder_token_ids={"<UserID>": USER_PH, "<ItemID>": ITEM_PH})
    with torch.no_grad():  # B = 0 at init would hide every LoRA bug; make the adapters non-trivial
        g = torch.Generator().manual_seed(seed + 1)
        for mod in lm.lora_layers().values():
            for B in mod.lora_B:
                B.copy_(0.1 * torch.randn(B.shape, generator=g))
    return lm


class FakePrep:
    def __init__(self, user, label):
        class Inter:
            pass
        self.inter = Inter()
        self.inter.user, self.inter.label = np.asarray(user), np.asarray(label)


class FakeBuilder:
    """Deterministic random prompts per row: lengths 5..17 (odd spread), optional CF slots."""

    def __init__(self, n_rows=64, n_users=6, ids=False, seed=0):
        rng = np.random.default_rng(seed)
        self.prep = FakePrep(rng.integers(0, n_users, n_rows), rng.integers(0, 2, n_rows))
        self.ids, self.seed = ids, seed
        self.n_items = 11

    def warm(self, rows):
        pass

    def sample(self, row, trace=None):
        rng = np.random.default_rng([self.seed, int(row)])
        P = int(rng.integers(5, 18))
        ids = rng.integers(10, VOCAB, P)
        ph_pos = np.zeros(0, np.int64)
        kind = np.zeros(0, np.int8)
        index = np.zeros(0, np.int64)
        if self.ids:
            ph_pos = np.array([1, P - 3], dtype=np.int64)
            ids[ph_pos] = [ITEM_PH, USER_PH]
            kind = np.array([1, 0], np.int8)
            index = np.array([int(rng.integers(0, self.n_items)), int(self.prep.inter.user[row])])
        label = int(self.prep.inter.label[row])
        if trace is None:
            ans = np.array([YES if label else NO])
        else:  # a "reasoning trace": Yes/No then a few tokens, length from the trace text
            ans = np.concatenate([[YES if label else NO], rng.integers(10, VOCAB, len(trace))])
        return Sample(ids.astype(np.int64), ans.astype(np.int64), ph_pos, kind, index, label, int(row), 0)


def sample_set(n_rows=64, ids=False, seed=0, traces=False, rows=None) -> SampleSet:
    b = FakeBuilder(n_rows, ids=ids, seed=seed)
    rows = np.arange(n_rows) if rows is None else rows
    tr = {int(r): "x" * (3 + int(r) % 5) for r in rows} if traces else None
    return SampleSet(b, rows, tr)
