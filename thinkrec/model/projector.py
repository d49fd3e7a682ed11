"""CF projector (CoLLM style): collaborative embeddings become token embeddings of the LLM.

    proj(e) = W2 @ relu(W1 @ e + b1) + b2          e: [P, d_cf] -> [P, D]   (W1: [mid, d_cf], W2: [D, mid])

The official code uses Linear(256, 2560) -> ReLU -> Linear(2560, hidden); `mid=2560` is that default.
The projected vectors replace the embeddings of the placeholder tokens (<UserID>, <ItemID>) in the order
the placeholders appear in the prompt (row-major over the batch).
"""

import torch
import torch.nn as nn


class CFProjector(nn.Module):
    def __init__(self, cf_dim: int, hidden: int, mid: int = 2560):
        super().__init__()
        self.cf_dim, self.hidden, self.mid = cf_dim, hidden, mid
        self.net = nn.Sequential(nn.Linear(cf_dim, mid), nn.ReLU(), nn.Linear(mid, hidden))

    def forward(self, cf: torch.Tensor) -> torch.Tensor:
        if cf.shape[-1] != self.cf_dim:
            raise ValueError(f"thinkrec/model/projector.py CFProjector: CF embeddings have size {cf.shape[-1]}, "
                             f"the projector was built for {self.cf_dim}")
        return self.net(cf.to(self.net[0].weight.dtype))


def scatter_placeholders(embeds: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Return `embeds` with embeds[mask] = values, differentiable in `values` (and `embeds`).

    embeds: [B, T, D], mask: [B, T] bool, values: [P, D] with P = mask.sum(), in row-major order of the
    True positions (row 0's placeholders first, each row left to right).
    """
    n_slots = int(mask.sum())
    if values.shape[0] != n_slots:
        raise ValueError(f"thinkrec/model/projector.py: the batch has {n_slots} placeholder tokens but "
                         f"{values.shape[0]} CF embeddings were given (one per placeholder, prompt order)")
    if n_slots == 0:
        return embeds
    # masked_scatter fills the True positions in row-major order: the same order as `values`
    return embeds.masked_scatter(mask[..., None], values.to(embeds.dtype))


def cf_rows(user_emb: torch.Tensor, item_emb: torch.Tensor, kind: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The CF embedding of each placeholder slot: user_emb[index] where kind == 0, item_emb[index] where
    kind == 1. user_emb: [U, d], item_emb: [I, d], kind, index: [P] (the data's ph_kind / ph_index,
    concatenated over the batch in row order) -> [P, d]."""
    kind, index = kind.long(), index.long()
    if kind.numel() and int(kind.max()) > 1:
        raise ValueError("thinkrec/model/projector.py cf_rows: kind must be 0 (user) or 1 (item)")
    for k, table, what in ((0, user_emb, "user"), (1, item_emb, "item")):
        sel = index[kind == k]
        if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= table.shape[0]):
            raise ValueError(f"thinkrec/model/projector.py cf_rows: {what} index {int(sel.max())} out of range "
                             f"for {table.shape[0]} {what} embeddings")
    users = user_emb[index.clamp(max=user_emb.shape[0] - 1)]
    items = item_emb[index.clamp(max=item_emb.shape[0] - 1)]
    return torch.where((kind == 0)[:, None], users, items)
