"""Batches for training and scoring, and the score both read: prompt + answer, left-padded, with the positions
the losses read and the Yes logit. Training (thinkrec.train) and inference (thinkrec.infer) both import this
module; neither imports the other.

A sample (`thinkrec.data.tokenize.Sample`) is a prompt `p [P]` and an answer `a [A]` (" Yes"/" No", or a
reasoning trace). The model reads `x = p + a[:-1]` (the last answer token predicts nothing, so it is not
fed); row b of the batch is left-padded to T = max_b len(x_b), offset o_b = T - len(x_b):

    yes_col[b]        = o_b + P_b - 1                  the position whose logits predict a[0]
    answer positions  = (b, o_b + P_b - 1 + j), j < A_b   predicting a[j]  (flattened, row-major)
    placeholder mask  = (b, o_b + ph_pos)              CF slots, filled by the projector in prompt order

Shared prefixes (`collate(..., share=True)`): a row whose first n >= MIN_SHARED tokens equal those of an
earlier row of the same user (same tokens, same CF slots; rows of one user rated in the same second have one
history, so their prompts differ from the target item on) names that row its lead: share_lead[b], share_len[b]
= n (0 for the rest). The padding-free forward then computes those tokens once (thinkrec/model/packed.py), and
ph_kind / ph_index leave out the slots among them (their CF vectors come from the lead row). Only prompt tokens
before the Yes position are shared, so every row computes its own Yes position and answer.

Losses are sums divided by counts of the GLOBAL batch (`n_rows`, `n_tokens`), so shards of one batch on
several ranks add up to the loss of the whole batch (see thinkrec/train/ddp.py).
"""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64, left-padded with pad_id
    attention_mask: torch.Tensor  # [B, T] int64, 1 = token
    yes_col: torch.Tensor  # [B] int64
    labels: torch.Tensor  # [B] float32
    ans_row: torch.Tensor  # [N_ans] int64
    ans_col: torch.Tensor  # [N_ans] int64
    ans_target: torch.Tensor  # [N_ans] int64
    ph_mask: torch.Tensor  # [B, T] bool
    ph_kind: torch.Tensor  # [P] int64, 0 = user, 1 = item (row-major prompt order)
    ph_index: torch.Tensor  # [P] int64
    rows: np.ndarray  # [B] data row indices
    users: torch.Tensor  # [B] int64
    reasoning: bool  # every row carries a reasoning trace (homogeneous batches, see loop.py)
    n_rows: int  # rows of the global batch this one is a shard of
    n_tokens: int  # answer tokens of the global batch
    share_lead: torch.Tensor | None = None  # [B] int64: the row whose prefix row b reuses (b: none)
    share_len: torch.Tensor | None = None  # [B] int64: how many leading tokens it reuses (0: none)

    @property
    def share(self):
        """The forward's `share` argument: (lead, n), or None when no row reuses another's prefix."""
        return None if self.share_len is None else (self.share_lead, self.share_len)

    def to(self, device) -> "Batch":
        out = Batch(**self.__dict__)
        for k, v in self.__dict__.items():
            if isinstance(v, torch.Tensor):
                setattr(out, k, v.to(device, non_blocking=True))
        return out


MIN_SHARED = 16  # tokens: a shorter common prefix is not worth a gathered attention grid


def _slot_keys(s) -> np.ndarray:
    """The tokens the model reads for sample s, CF slots replaced by a negative code of (index, kind), so
    equal keys mean equal embeddings."""
    x = np.concatenate([s.input_ids, s.answer_ids[:-1]]).astype(np.int64)
    pos = np.asarray(s.ph_pos, dtype=np.int64)
    x[pos] = -(3 + 2 * np.asarray(s.ph_index, dtype=np.int64) + np.asarray(s.ph_kind, dtype=np.int64))
    return x


def shared_prefixes(samples, users, min_len: int = MIN_SHARED):
    """(lead [B], n [B]) int64: for each row the earlier row of the same user with which it shares the longest
    common prefix of at least min_len tokens (never past its own Yes position), or (itself, 0). Lead rows
    share nothing themselves."""
    B = len(samples)
    lead, n = np.arange(B, dtype=np.int64), np.zeros(B, dtype=np.int64)
    keys = [_slot_keys(s) for s in samples]
    users = np.asarray(users)
    for b in range(B):
        for a in range(b):
            if n[a] or users[a] != users[b]:
                continue
            k = min(len(keys[a]), samples[b].yes_pos)
            diff = np.flatnonzero(keys[a][:k] != keys[b][:k])
            common = int(diff[0]) if len(diff) else k
            if common >= min_len and common > n[b]:
                lead[b], n[b] = a, common
    return lead, n


def collate(samples, users, pad_id: int, reasoning: bool = False, n_rows: int = None,
            n_tokens: int = None, share: bool = False) -> Batch:
    """Stack `samples` (list of Sample) into a left-padded Batch. users: [B] user index per sample.

    n_rows / n_tokens: sizes of the global batch when these samples are one rank's shard (default: this).
    share: find rows that reuse another row's prefix (module docstring; padding-free models only).
    """
    if not samples:
        raise ValueError("collate: empty list of samples")
    lead, shared = shared_prefixes(samples, users) if share else (None, None)
    lens = [len(s.input_ids) + len(s.answer_ids) - 1 for s in samples]
    B, T = len(samples), max(lens)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    ph = np.zeros((B, T), dtype=bool)
    yes_col = np.empty(B, dtype=np.int64)
    ans_row, ans_col, ans_tgt, kinds, index = [], [], [], [], []
    for b, (s, n) in enumerate(zip(samples, lens)):
        o = T - n
        x = np.concatenate([s.input_ids, s.answer_ids[:-1]])
        ids[b, o:] = x
        mask[b, o:] = 1
        A = len(s.answer_ids)
        yes_col[b] = o + s.yes_pos
        ans_row.append(np.full(A, b, dtype=np.int64))
        ans_col.append(yes_col[b] + np.arange(A, dtype=np.int64))
        ans_tgt.append(np.asarray(s.answer_ids, dtype=np.int64))
        ph_pos = np.asarray(s.ph_pos, dtype=np.int64)
        ph[b, o + ph_pos] = True
        own = slice(None) if shared is None else ph_pos >= shared[b]  # slots the row computes itself
        kinds.append(np.asarray(s.ph_kind, dtype=np.int64)[own])
        index.append(np.asarray(s.ph_index, dtype=np.int64)[own])
    t = torch.from_numpy
    n_ans = sum(len(s.answer_ids) for s in samples)
    return Batch(
        input_ids=t(ids), attention_mask=t(mask), yes_col=t(yes_col),
        labels=torch.tensor([float(s.label) for s in samples], dtype=torch.float32),
        ans_row=t(np.concatenate(ans_row)), ans_col=t(np.concatenate(ans_col)), ans_target=t(np.concatenate(ans_tgt)),
        ph_mask=t(ph), ph_kind=t(np.concatenate(kinds)), ph_index=t(np.concatenate(index)),
        rows=np.array([s.row for s in samples], dtype=np.int64), users=torch.as_tensor(np.asarray(users), dtype=torch.long),
        reasoning=reasoning, n_rows=B if n_rows is None else n_rows, n_tokens=n_ans if n_tokens is None else n_tokens,
        **({} if shared is None or not shared.any() else {"share_lead": t(lead), "share_len": t(shared)}),
    )


def right_padded(samples, pad_id: int) -> dict:
    """The samples' prompts as right-padded [N, T] int64 tensors (for KV-cached decoding and exported
    scorers): input_ids, attention_mask, slot_kind (0 = token, 1 = user slot, 2 = item slot), slot_index
    (the slot's user / item index). Plain answers are one token, so the prompt is all the model reads."""
    n, T = len(samples), max(len(s.input_ids) for s in samples)
    ids = torch.full((n, T), pad_id, dtype=torch.long)
    mask = torch.zeros(n, T, dtype=torch.long)
    kind = torch.zeros(n, T, dtype=torch.long)
    index = torch.zeros(n, T, dtype=torch.long)
    for r, s in enumerate(samples):
        ids[r, :len(s.input_ids)] = torch.as_tensor(s.input_ids)
        mask[r, :len(s.input_ids)] = 1
        pos = torch.as_tensor(np.asarray(s.ph_pos, dtype=np.int64))
        kind[r, pos] = torch.as_tensor(np.asarray(s.ph_kind, dtype=np.int64)) + 1
        index[r, pos] = torch.as_tensor(np.asarray(s.ph_index, dtype=np.int64))
    return {"input_ids": ids, "attention_mask": mask, "slot_kind": kind, "slot_index": index}


def shard(indices, rank: int, world: int) -> list:
    """Rank `rank`'s contiguous share of one global batch (sizes differ by at most one)."""
    n = len(indices)
    lo, hi = rank * n // world, (rank + 1) * n // world
    return list(indices[lo:hi])


def cf_vectors(kind, index, user_emb: torch.Tensor, item_emb: torch.Tensor):
    """CF vectors [P, d] of slots given by kind [P] (0 = user, 1 = item) and index [P], or None when
    there are no slots or no CF tables."""
    kind, index = torch.as_tensor(kind), torch.as_tensor(index)
    if kind.numel() == 0 or user_emb is None:
        return None
    is_user = kind == 0
    out = torch.zeros(len(kind), user_emb.shape[1], dtype=user_emb.dtype, device=user_emb.device)
    item = ~is_user & (index >= 0)  # index -1: no item (the official "Unknow" entry), a zero vector
    out[is_user] = user_emb[index[is_user]]
    out[item] = item_emb[index[item]]
    return out


def cf_inputs(batch: Batch, user_emb: torch.Tensor, item_emb: torch.Tensor):
    """CF vectors [P, d] for the batch's placeholder slots (user or item embedding by kind), or None."""
    return cf_vectors(batch.ph_kind, batch.ph_index, user_emb, item_emb)


def yes_positions(batch):
    """(rows, cols) of each row's Yes position: the model's `select` for scoring."""
    return torch.arange(len(batch.yes_col), device=batch.yes_col.device), batch.yes_col


@torch.no_grad()
def yes_logits(h: torch.Tensor, lm_head: torch.Tensor, yes_id: int, yes_col: torch.Tensor) -> torch.Tensor:
    """Scores [B]: the Yes logit at each row's first answer position (one dot product per row).
    h: [B, T, D], or [B, D] already at the Yes positions (forward with select=(arange(B), yes_col))."""
    if h.dim() == 3:
        h = h[torch.arange(h.shape[0], device=h.device), yes_col]
    return h.float() @ lm_head[yes_id].float()
