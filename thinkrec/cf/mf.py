"""Matrix factorisation with biases: the CoLLM / ThinkRec default CF model.

    logit(u, i) = <P_u, Q_i> + b_u + c_i + g          P: [n_users, D], Q: [n_items, D], b, c: [n], g: []

`bias=False` ("mf-nobias") is CoLLM's MF, the dot product alone (its rec_base_models.py leaves the bias
terms out), so the embeddings must carry each user's and item's like rate themselves: the CF tokens then
get MF's whole signal from P_u and Q_i. Trained with BCE on the train split's (user, item, label) rows
(thinkrec.cf.train).
"""

import torch
from torch import nn


class MF(nn.Module):
    needs = ("user", "item")  # the row features `forward` reads (see thinkrec.cf.train.RowData)

    def __init__(self, n_users: int, n_items: int, dim: int, init_std: float = 0.01, bias: bool = True):
        super().__init__()
        self.user_emb = nn.Embedding(n_users, dim)
        self.item_emb = nn.Embedding(n_items, dim)
        self.bias = bias
        if bias:  # made before the embeddings' init: the random stream, so the values, as before mf-nobias existed
            self.user_bias = nn.Embedding(n_users, 1)
            self.item_bias = nn.Embedding(n_items, 1)
            self.global_bias = nn.Parameter(torch.zeros(()))
        for e in (self.user_emb, self.item_emb):
            nn.init.normal_(e.weight, std=init_std)
        if bias:
            for e in (self.user_bias, self.item_bias):
                nn.init.zeros_(e.weight)

    def forward(self, batch: dict) -> torch.Tensor:
        """batch["user"], batch["item"]: [B] int64 -> logits [B]."""
        u, i = batch["user"], batch["item"]
        dot = (self.user_emb(u) * self.item_emb(i)).sum(-1)
        if not self.bias:
            return dot
        return dot + self.user_bias(u).squeeze(-1) + self.item_bias(i).squeeze(-1) + self.global_bias

    @torch.no_grad()
    def fill_cold_users(self, seen: torch.Tensor) -> None:
        """Users without a training row keep their random init, which only adds noise to their scores;
        give them the mean trained user vector and bias instead (a "typical user")."""
        if seen.all() or not seen.any():
            return
        for table in (self.user_emb.weight, *((self.user_bias.weight,) if self.bias else ())):
            table[~seen] = table[seen].mean(0)

    def export(self) -> dict:
        """Tensors saved to RUN/cf/mf.safetensors (mf-nobias.safetensors: the embeddings alone)."""
        if not self.bias:
            return {"user_emb": self.user_emb.weight, "item_emb": self.item_emb.weight}
        return {
            "user_emb": self.user_emb.weight, "item_emb": self.item_emb.weight,
            "user_bias": self.user_bias.weight.squeeze(-1), "item_bias": self.item_bias.weight.squeeze(-1),
            "global_bias": self.global_bias.reshape(1),
        }
