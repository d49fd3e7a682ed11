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
            raise ValueError(f"CF embeddings have size {cf.shape[-1]}, "
                             f"the projector was built for {self.cf_dim}")
        return self.net(cf.to(self.net[0].weight.dtype))


def scatter_placeholders(embeds: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Return `embeds` with embeds[mask] = values, differentiable in `values` (and `embeds`).

    embeds: [B, T, D], mask: [B, T] bool, values: [P, D] with P = mask.sum(), in row-major order of the
    True positions (row 0's placeholders first, each row left to right).
    """
    n_slots = int(mask.sum())
    if values.shape[0] != n_slots:
        raise ValueError(f"the batch has {n_slots} placeholder tokens but "
                         f"{values.shape[0]} CF embeddings were given (one per placeholder, prompt order)")
    if n_slots == 0:
        return embeds
    # masked_scatter fills the True positions in row-major order: the same order as `values`
    return embeds.masked_scatter(mask[..., None], values.to(embeds.dtype))

