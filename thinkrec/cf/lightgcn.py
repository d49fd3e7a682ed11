"""LightGCN (He et al., 2020) on the train split's user-item graph, with user and item biases.

    A = [[0, R], [R^T, 0]]  (n_users + n_items square, R[u, i] = 1 for each train edge)
    A_hat = D^-1/2 A D^-1/2,  E^(0) = [P; Q]  ([n_users + n_items, D]),  E^(l+1) = A_hat E^(l)
    E = mean_{l=0..L} E^(l),   logit(u, i) = <E_u, E_{n_users+i}> + b_u + c_i + g

Edges: by default the liked train rows only (label 1), the usual LightGCN graph; `graph="all"` uses every
train row. Trained with BCE like MF (thinkrec.cf.train).
"""

import warnings

import numpy as np
import torch
from torch import nn


def normalized_adjacency(user: np.ndarray, item: np.ndarray, n_users: int, n_items: int) -> torch.Tensor:
    """Sparse CSR A_hat [n_users + n_items, n_users + n_items] float32; duplicate edges count once."""
    n = n_users + n_items
    pairs = np.unique(np.stack([user, item + n_users]), axis=1) if len(user) else np.zeros((2, 0), np.int64)
    rows = np.concatenate([pairs[0], pairs[1]])
    cols = np.concatenate([pairs[1], pairs[0]])
    deg = np.bincount(rows, minlength=n).astype(np.float64)
    inv_sqrt = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1)), 0.0)
    vals = inv_sqrt[rows] * inv_sqrt[cols]
    coo = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([rows, cols])), torch.from_numpy(vals.astype(np.float32)), (n, n),
        check_invariants=True,
    )
    with warnings.catch_warnings():  # "sparse CSR is beta": CSR is what makes sparse.mm fast on CPU
        warnings.simplefilter("ignore", UserWarning)
        return coo.coalesce().to_sparse_csr()


class LightGCN(nn.Module):
    needs = ("user", "item")

    def __init__(self, n_users: int, n_items: int, dim: int, adjacency: torch.Tensor, n_layers: int = 2,
                 init_std: float = 0.01):
        super().__init__()
        self.n_users, self.n_layers = n_users, n_layers
        self.emb = nn.Embedding(n_users + n_items, dim)
        self.bias = nn.Embedding(n_users + n_items, 1)
        self.global_bias = nn.Parameter(torch.zeros(()))
        nn.init.normal_(self.emb.weight, std=init_std)
        nn.init.zeros_(self.bias.weight)
        self.register_buffer("adjacency", adjacency, persistent=False)
        self._cache = None  # propagated table, reused while not training

    def propagate(self) -> torch.Tensor:
        """E = mean over layers 0..L of A_hat^l E^(0): [n_users + n_items, D]."""
        if not self.training and self._cache is not None:
            return self._cache
        layer = self.emb.weight
        total = layer
        for _ in range(self.n_layers):
            layer = torch.sparse.mm(self.adjacency, layer)
            total = total + layer
        out = total / (self.n_layers + 1)
        self._cache = None if self.training else out.detach()
        return out

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def forward(self, batch: dict) -> torch.Tensor:
        """batch["user"], batch["item"]: [B] int64 -> logits [B]."""
        e = self.propagate()
        u, i = batch["user"], batch["item"] + self.n_users
        dot = (e[u] * e[i]).sum(-1)
        return dot + self.bias.weight[u, 0] + self.bias.weight[i, 0] + self.global_bias

    @torch.no_grad()
    def fill_cold_users(self, seen: torch.Tensor) -> None:
        """Users without train rows: mean trained final user vector and bias (see MF.fill_cold_users).
        Such a node has no edges, so its A_hat rows are zero and its final vector is E^(0) / (L + 1):
        setting E^(0) = (L + 1) * mean lands exactly on the mean, and no other node is affected."""
        seen = seen.to(torch.bool)
        if seen.all() or not seen.any():
            return
        self._cache = None
        final = self.propagate()[: self.n_users]
        self.emb.weight[: self.n_users][~seen] = final[seen].mean(0) * (self.n_layers + 1)
        self.bias.weight[: self.n_users][~seen] = self.bias.weight[: self.n_users][seen].mean(0)
        self._cache = None

    def export(self) -> dict:
        was = self.training
        self.eval()
        e = self.propagate()
        self.train(was)
        return {
            "user_emb": e[: self.n_users], "item_emb": e[self.n_users:],
            "user_bias": self.bias.weight[: self.n_users, 0], "item_bias": self.bias.weight[self.n_users:, 0],
            "global_bias": self.global_bias.reshape(1),
        }
