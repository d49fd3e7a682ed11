"""CF projector (CoLLM style): collaborative embeddings become token embeddings of the LLM.

    proj(e) = W2 @ relu(W1 @ z + b1) + b2,   z = (e - mean) / std     e: [P, d_cf] -> [P, D]
                                                                       (W1: [mid, d_cf], W2: [D, mid])

The official code uses Linear(256, 2560) -> ReLU -> Linear(2560, hidden); `mid=2560` is that default.
The projected vectors replace the embeddings of the placeholder tokens (<UserID>, <ItemID>) in the order
the placeholders appear in the prompt (row-major over the batch).

What the tokens carry (`inputs`, cf_token_tables): "emb" is the CF model's user / item embedding (the
official code's); "emb+bias" appends the model's user / item bias, [P_u, b_u] / [Q_i, c_i]. On the paper's
ML-1M split MF's biases alone reach test AUC 0.717 and its dot product alone 0.677 (bench/baselines.py):
without the bias column the LLM never sees the stronger half. CoLLM's MF has no biases, so its embeddings
hold popularity; ours need not.

Standardisation and scale (`fit_inputs`): MF vectors have a per-dimension std of ~0.03, so through a
default-initialised MLP a projected token is almost only the layers' biases and every CF token starts nearly
the same. fit_inputs stores the tables' per-column mean and std (z has unit variance) and rescales W2 (b2 = 0)
so that the initial tokens' mean norm is `target_norm` (the median norm of the LLM's token embeddings).
A projector never fitted (mean 0, std 1, default init) is the official one.

Held norm (`hold_norm`, train.py --cf-scale held): every output is rescaled to norm `out_norm` on every forward,
so training can move a token's direction only. Measured with the norm free (docs/results.md), 64 projector steps
at lr 1e-3 blew the tokens up to 15x a token's norm and collapsed them to one direction (cosine 0.95).
"""

import torch
import torch.nn as nn


CF_INPUTS = ("emb", "emb+bias")
CF_SLOTS = ("all", "two")  # every item of the prompt has a CF token, or only the user and the target item


def cf_token_tables(cf: dict, inputs: str = "emb") -> tuple[torch.Tensor, torch.Tensor]:
    """(user table [n_users, d], item table [n_items, d]) of what the CF tokens carry, from a CF export
    (thinkrec.cf.train.save: user_emb, item_emb and, for MF and LightGCN, user_bias, item_bias). A model
    without biases (SASRec) gets a zero bias column under "emb+bias"."""
    if inputs not in CF_INPUTS:
        raise ValueError(f"CF token inputs {inputs!r}: expected one of {CF_INPUTS}")
    ue, ie = cf["user_emb"], cf["item_emb"]
    if inputs == "emb":
        return ue, ie
    ub = cf.get("user_bias", ue.new_zeros(len(ue))).reshape(-1, 1).to(ue.dtype)
    ib = cf.get("item_bias", ie.new_zeros(len(ie))).reshape(-1, 1).to(ie.dtype)
    return torch.cat([ue, ub], 1), torch.cat([ie, ib], 1)


class CFProjector(nn.Module):
    def __init__(self, cf_dim: int, hidden: int, mid: int = 2560, inputs: str = "emb", slots: str = "all"):
        super().__init__()
        if inputs not in CF_INPUTS:
            raise ValueError(f"CF token inputs {inputs!r}: expected one of {CF_INPUTS}")
        if slots not in CF_SLOTS:
            raise ValueError(f"CF token slots {slots!r}: expected one of {CF_SLOTS}")
        self.cf_dim, self.hidden, self.mid, self.inputs = cf_dim, hidden, mid, inputs
        self.slots = slots  # which prompt items carry a CF token: "all" (the paper's) or "two" (user and target)
        self.net = nn.Sequential(nn.Linear(cf_dim, mid), nn.ReLU(), nn.Linear(mid, hidden))
        self.register_buffer("in_mean", torch.zeros(cf_dim))
        self.register_buffer("in_std", torch.ones(cf_dim))
        self.register_buffer("out_norm", torch.zeros(()))  # > 0: every output rescaled to this norm
        self.held = False  # out_norm > 0, as a Python bool (no data-dependent branch in a traced forward)
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync_held())

    def _sync_held(self) -> None:
        self.held = bool(self.out_norm > 0)

    def forward(self, cf: torch.Tensor) -> torch.Tensor:
        if cf.shape[-1] != self.cf_dim:
            raise ValueError(f"CF embeddings have size {cf.shape[-1]}, "
                             f"the projector was built for {self.cf_dim}")
        z = (cf.to(self.in_mean.dtype) - self.in_mean) / self.in_std
        y = self.net(z.to(self.net[0].weight.dtype))
        if self.held:
            y = y * (self.out_norm.to(y.dtype) / y.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        return y

    @torch.no_grad()
    def fit_inputs(self, tables, target_norm: float) -> None:
        """Standardise the inputs to the rows of `tables` (per column; a constant column keeps std 1) and
        rescale the output layer so that the tokens of those rows start with mean norm `target_norm`."""
        x = torch.cat([t.float() for t in tables])
        std = x.std(0)
        self.in_mean.copy_(x.mean(0))
        self.in_std.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))
        self.net[2].bias.zero_()
        norm = self(x.to(self.in_mean.device)).float().norm(dim=-1).mean()
        self.net[2].weight.mul_(target_norm / norm.clamp(min=1e-12))

    @torch.no_grad()
    def hold_norm(self, norm: float) -> None:
        """From now on every output has norm `norm` (0: free again)."""
        self.out_norm.fill_(norm)
        self._sync_held()


@torch.no_grad()
def token_report(projector: CFProjector, tables, token_embeddings: torch.Tensor, n: int = 256) -> dict:
    """How the projected CF tokens compare with the LLM's own: their mean norm against the median norm of the
    token embeddings, and the mean pairwise cosine among (up to n) users and among (up to n) items (near 1:
    the tokens barely differ). tables: (user table, item table)."""
    out = {"median_token_norm": round(float(token_embeddings.float().norm(dim=-1).median()), 4)}
    for name, tab in zip(("users", "items"), tables):
        idx = torch.linspace(0, len(tab) - 1, min(n, len(tab))).long()  # spread over the table, no RNG
        y = projector(tab[idx].to(projector.in_mean.device)).float()
        unit = torch.nn.functional.normalize(y, dim=-1)
        cos = unit @ unit.T
        m = len(y)
        out[name] = {"mean_norm": round(float(y.norm(dim=-1).mean()), 4),
                     "norm_vs_tokens": round(float(y.norm(dim=-1).mean()) / out["median_token_norm"], 4),
                     "mean_pairwise_cosine": round(float((cos.sum() - m) / max(m * (m - 1), 1)), 4)}
    return out


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

