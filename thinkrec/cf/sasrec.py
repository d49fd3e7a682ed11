"""SASRec (Kang & McAuley, 2018) as a pointwise scorer, CoLLM style: the representation of the user's
last L interactions before a row, dotted with the row's target item. One self-attention block, evaluated
only at the position that is read out.

    x_t = Q[item_t] + Y[label_t] + pos_t      t = 1..L: history, oldest first, left padded
    x_0 = q + x_L                             the read-out ("now") token: a learned vector plus the most
                                              recent interaction, so an empty history still has a state
    a   = x_0 + Attn(LN(x_0), LN(x_{0..L}))   one query, keys/values over the history and itself,
                                              padding masked out; n_heads heads
    h   = LN(a + FFN(LN(a)))                  [B, D]: the user state
    h'  = h + P[user]                         optional (`n_users` > 0): a per-user vector, an MF term
    logit = <h', Q[target]> + c_target + g   (+ <w, h'> + b with `user_bias`)

Exported as MF's layout: user_emb = h' at the user's last train rows, item_emb = Q, item_bias = c,
global_bias = g (and user_bias = <w, h'> + b with `user_bias`).

Q: [n_items + 1, D] (last row = padding, kept at zero), Y: [3, D] (dislike, like, padding). The default
is SASRec's own input, the item sequence alone (`use_labels=False`: Y is not added), which is what the
paper's baseline row measures. `use_labels=True` adds the label embedding Y (a history of dislikes is
information SASRec does not see); it raises AUC and lowers UAUC (below).

Default, as `bench/baselines.py` runs it (2026-11-22, use_labels=False, lr 1e-3, D 64, grid wd {1e-2, 1e-3,
1e-4} selected on valid AUC): wd 1e-3, valid .6919 / .6900 -> test AUC .7073, UAUC .6765, NDCG@5 .7827,
MAP@5 .4800 (paper row .6956 / .6687 / .7663 / .4747). The measurements below were made with labels on.

Options measured on the paper's ML-1M split (lr 1e-3, D = 64, selection on valid AUC, test AUC / UAUC):
plain 0.7411 / 0.6524 (wd 1e-6); `target_query` (the target's embedding added to the read-out token,
DIN-style, so the state depends on the target) 0.7417 / 0.6519: no gain, off by default. `tie_output=False`
gives the target its own embedding table instead of sharing Q.

The AUC / UAUC trade-off (measured 2026-11-22, lr 1e-3, D 64, valid AUC / UAUC -> test AUC / UAUC):
the label-aware history tells the model the user's like-rate, which ranks users (AUC) but not a user's
items (UAUC: per-user offsets cancel). Stronger weight decay or dropping the labels moves the model from
the first to the second: wd 1e-3 .7385/.6626 -> .7467/.6591; wd 1e-2 .7253/.6774 -> .7381/.6652;
use_labels=False wd 1e-2 .6874/.6840 -> .7075/.6840. The per-user vector P (`n_users`) is the user-personal
term: wd 1e-3 .7368/.6668 -> .7444/.6510; wd 1e-2 .7237/.6776 -> .7379/.6666; wd 3e-2 .6924/.6822 ->
.7114/.6818; D 128 wd 1e-2 .7337/.6644 -> .7436/.6565. `user_bias` (an item-independent offset read from
the state) lets the offset take the like-rate and the dot product stop learning the ranking: wd 1e-3
.7467/.5922 -> .7653/.5878, off by default. Dropout 0.2 (wd 1e-2) .7223/.6696 -> .7349/.6633 at 2x the time.
Selecting epochs and configs on the official AUC/4 + UAUC/3 instead of AUC: plain wd 1e-3 .7328/.6756 ->
.7430/.6517; with P, grid wd {1e-3, 1e-2}: wd 1e-3 .7349/.6705 -> .7438/.6597 (wd 2e-2 .7045/.6830 -> .7226/
.6793 scores lower); `item_wd` (the item tables' decay scaled) 10 at wd 1e-3 .7271/.6763 -> .7392/.6637,
0.1 at wd 1e-2 .7291/.6751 -> .7411/.6627. All within ~0.005 of each other on valid: the default stays the
valid-AUC choice (plain, wd 1e-3). Only a UAUC-heavy rule would pick the high-UAUC variants (P + wd 3e-2,
or no labels), at ~0.035 test AUC.

Why one block read out at one position: in a one-block Transformer only the read-out token's query,
output projection and FFN matter, so computing them for all L positions (nn.TransformerEncoder) wastes
~2/3 of the FLOPs; with dropout (bernoulli is 25% of CPU time) off, this is ~5x faster per epoch on
2 CPU cores at L = 25, D = 64, and the paper's CF models are small enough that depth is not the limit.
"""

import torch
import torch.nn.functional as F
from torch import nn

from thinkrec.errors import UsageError


class SASRec(nn.Module):
    needs = ("item", "hist_item", "hist_label")

    def __init__(self, n_items: int, dim: int, max_len: int = 25, n_heads: int = 2, dropout: float = 0.0,
                 use_labels: bool = False, target_query: bool = False, tie_output: bool = True,
                 init_std: float = 0.02, n_users: int = 0, user_bias: bool = False,
                 item_wd: float = 1.0):
        super().__init__()
        if dim % n_heads:
            raise UsageError(f"--dim {dim}: SASRec's dim must be divisible by its {n_heads} attention heads")
        self.n_items, self.max_len, self.use_labels, self.n_heads = n_items, max_len, use_labels, n_heads
        self.target_query, self.item_wd = target_query, item_wd
        # optional per-user vector P_u added to the state (an MF term inside SASRec); needs the user id
        self.user_emb = nn.Embedding(n_users, dim) if n_users else None
        # optional item-independent offset <w, h> + b: the history's like-rate, MF's b_u read from the state
        self.user_bias_head = nn.Linear(dim, 1) if user_bias else None
        self.needs = ("user",) + type(self).needs if n_users else type(self).needs
        # the target's embedding: the input table (tied, SASRec's choice) or a table of its own
        self.out_emb = None if tie_output else nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        self.label_emb = nn.Embedding(3, dim)
        self.pos_emb = nn.Embedding(max_len + 1, dim)
        self.now = nn.Parameter(torch.zeros(dim))
        self.item_bias = nn.Embedding(n_items + 1, 1, padding_idx=n_items)
        self.global_bias = nn.Parameter(torch.zeros(()))
        self.ln_kv, self.ln_q, self.ln_ff, self.ln_out = (nn.LayerNorm(dim) for _ in range(4))
        self.q_proj, self.kv_proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.o_proj = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)
        for w in (self.item_emb.weight, self.label_emb.weight, self.pos_emb.weight, self.now):
            nn.init.normal_(w, std=init_std)
        for e in (self.out_emb, self.user_emb):
            if e is not None:
                nn.init.normal_(e.weight, std=init_std)
        nn.init.zeros_(self.item_bias.weight)
        with torch.no_grad():
            self.item_emb.weight[n_items].zero_()

    def represent(self, hist_item: torch.Tensor, hist_label: torch.Tensor, target=None) -> torch.Tensor:
        """hist_item [B, L] (pad = n_items), hist_label [B, L] (0/1, pad = 2) -> user state [B, D].
        With `target_query`, the target items [B] join the read-out token's input (None: left out)."""
        b, length = hist_item.shape
        if length != self.max_len:
            raise ValueError(f"history length {length} != max_len {self.max_len}")
        x = self.item_emb(hist_item)
        if self.use_labels:
            x = x + self.label_emb(hist_label)
        x = x + self.pos_emb.weight[1:]  # [B, L, D]
        x0 = self.now + self.pos_emb.weight[0] + x[:, -1]  # [B, D]; x[:, -1] is zero-item when empty
        if self.target_query and target is not None:
            x0 = x0 + self.item_emb(target)
        x = self.dropout(torch.cat([x0[:, None], x], dim=1))  # [B, L+1, D]
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool), hist_item != self.n_items], dim=1)
        d, h = x.shape[-1], self.n_heads
        q = self.q_proj(self.ln_q(x[:, 0])).view(b, h, 1, d // h)  # [B, H, 1, D/H]
        k, v = self.kv_proj(self.ln_kv(x)).view(b, length + 1, 2, h, d // h).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # [B, H, 1, D/H]
        a = x[:, 0] + self.dropout(self.o_proj(att.reshape(b, d)))
        return self.ln_out(a + self.dropout(self.ffn(self.ln_ff(a))))

    def param_groups(self, weight_decay: float) -> list:
        """Adam groups: the item tables (Q, c, the output table) decay at item_wd * weight_decay, the rest
        at weight_decay."""
        item = [p for m in (self.item_emb, self.item_bias, self.out_emb) if m is not None for p in m.parameters()]
        ids = {id(p) for p in item}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return [{"params": item, "weight_decay": weight_decay * self.item_wd},
                {"params": rest, "weight_decay": weight_decay}]

    def forward(self, batch: dict) -> torch.Tensor:
        """batch["item"] [B], batch["hist_item"], batch["hist_label"] [B, L] -> logits [B]."""
        i = batch["item"]
        h = self.represent(batch["hist_item"], batch["hist_label"], i)
        if self.user_emb is not None:
            h = h + self.user_emb(batch["user"])
        out = self.item_emb if self.out_emb is None else self.out_emb
        logit = (h * out(i)).sum(-1) + self.item_bias(i).squeeze(-1) + self.global_bias
        if self.user_bias_head is not None:
            logit = logit + self.user_bias_head(h).squeeze(-1)
        return logit

    @torch.no_grad()
    def fill_cold_users(self, seen: torch.Tensor) -> None:
        """The history part needs nothing (a user is represented by their history); the optional user
        vectors of users without train rows get the mean trained vector (see MF.fill_cold_users)."""
        if self.user_emb is None or seen.all() or not seen.any():
            return
        self.user_emb.weight[~seen] = self.user_emb.weight[seen].mean(0)

    def export(self, user_hist_item: torch.Tensor, user_hist_label: torch.Tensor) -> dict:
        """Tensors for RUN/cf/sasrec.safetensors; the user table is each user's state after their last
        train rows (user_hist_*: [n_users, L]); a user without train rows gets the empty-history state."""
        out = self.item_emb if self.out_emb is None else self.out_emb
        was = self.training
        self.eval()
        with torch.no_grad():
            users = self.represent(user_hist_item, user_hist_label)
            if self.user_emb is not None:  # <h + P_u, Q_i> = <user row, Q_i>: the export stays one table
                users = users + self.user_emb.weight
        self.train(was)
        tensors = {
            "user_emb": users, "item_emb": out.weight[: self.n_items],
            "item_bias": self.item_bias.weight[: self.n_items, 0], "global_bias": self.global_bias.reshape(1),
        }
        if self.user_bias_head is not None:  # MF's layout: logit = <user_emb, item_emb> + user_bias + item_bias + g
            with torch.no_grad():
                tensors["user_bias"] = self.user_bias_head(users).squeeze(-1)
        return tensors
