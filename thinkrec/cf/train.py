"""Training, selection and export of the CF models (MF, LightGCN, SASRec).

Every model maps a batch of rows to logits and is trained with BCE on the train split:
    loss = mean_b BCEWithLogits(logit_b, y_b)
with Adam (L2 weight decay, as the official code), shuffled mini-batches, and early stopping on a valid
split score (the best epoch's weights are kept): AUC, or the official AUC/4 + UAUC/3
(`thinkrec.metrics.selection_score`; the default per model is SELECT). `search` runs a grid of (lr, dim,
weight decay) and keeps the configuration with the best valid score; `save` writes RUN/cf/<model>.json, then
RUN/cf/<model>.safetensors, the phase's completion marker; `load_embeddings` reads it back;
`train_cf(run_dir, CFConfig(...))` does all of it for a prepared run directory.
"""

import copy
import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from thinkrec.data.history import build_histories
from thinkrec.data.prepared import SPLITS, Interactions, Prepared, load_prepared
from thinkrec.io import ArtifactError, atomic_write_bytes, read_safetensors, require_keys, to_json, write_json
from thinkrec.metrics import evaluate, selection_score

from .lightgcn import LightGCN, normalized_adjacency
from .mf import MF
from .sasrec import SASRec

MODELS = ("mf", "lightgcn", "sasrec", "mf-nobias")
MAX_LEN = 25  # SASRec history length (the paper's)


@dataclass
class CFConfig:
    """One CF training run (the flags of `python -m thinkrec.cf train`). lr, dim and weight_decay, when set,
    replace the grid's values for that key (all three set: one configuration)."""

    model: str  # one of MODELS
    grid: str | None = None  # a key of GRIDS; None: the model's own grid
    lr: float | None = None  # Adam learning rate
    dim: int | None = None  # embedding size
    weight_decay: float | None = None  # Adam L2 weight decay
    batch_size: int = 2048  # rows per step
    max_epochs: int = 100
    patience: int = 5  # epochs without a better valid score before stopping
    seed: int = 0
    select: str | None = None  # "auc" or "official" (AUC/4 + UAUC/3) on valid; None: the model's, SELECT
    sasrec_labels: bool = False  # SASRec: add each history item's like/dislike label to its embedding
    threads: int = 1  # torch CPU threads; 1: these models are tiny and 2 threads spin-wait on a busy 2-core box
    progress: bool = True  # tqdm bars per configuration (train.py --no-progress turns them off)


@dataclass
class RowData:
    """All rows of a prepared dataset as tensors; `batch(idx, needs)` gathers what a model reads."""

    user: torch.Tensor  # [n] int64
    item: torch.Tensor  # [n] int64
    label: torch.Tensor  # [n] float32
    split: np.ndarray  # [n] int8
    hist_item: torch.Tensor | None = None  # [n, L] int64, pad = n_items
    hist_label: torch.Tensor | None = None  # [n, L] int64, pad = 2

    def batch(self, idx, needs) -> dict:
        return {k: getattr(self, k)[idx] for k in needs}

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS.index(split))


def row_data(inter: Interactions, n_items: int, max_len: int = 0) -> RowData:
    data = RowData(torch.from_numpy(inter.user.astype(np.int64)), torch.from_numpy(inter.item.astype(np.int64)),
                   torch.from_numpy(inter.label.astype(np.float32)), inter.split)
    if max_len:  # previous rows of the same user, any split: the data package's histories, shared with the prompts
        h = build_histories(inter.user, inter.timestamp, max_len)  # [n, max_len] row indices, -1 left padding
        pad = h < 0
        data.hist_item = torch.from_numpy(np.where(pad, n_items, inter.item[np.clip(h, 0, None)]).astype(np.int64))
        data.hist_label = torch.from_numpy(np.where(pad, 2, inter.label[np.clip(h, 0, None)]).astype(np.int64))
    return data


def user_train_histories(inter: Interactions, n_users: int, n_items: int, max_len: int):
    """Each user's last max_len train rows (oldest first, left padded): [n_users, L] items and labels."""
    tr = inter.of_split("train")
    order = np.lexsort((tr.timestamp, tr.user))
    items = np.full((n_users, max_len), n_items, np.int64)
    labels = np.full((n_users, max_len), 2, np.int64)
    us = tr.user[order]
    n = len(us)
    last = np.r_[us[1:] != us[:-1], True] if n else np.zeros(0, bool)  # last row of each user
    g_end = np.minimum.accumulate(np.where(last, np.arange(n), n)[::-1])[::-1]
    from_end = g_end - np.arange(n)  # 0 = the user's most recent train row
    keep = from_end < max_len
    rows = order[keep]
    items[us[keep], max_len - 1 - from_end[keep]] = tr.item[rows]
    labels[us[keep], max_len - 1 - from_end[keep]] = tr.label[rows]
    return torch.from_numpy(items), torch.from_numpy(labels)


def build_model(name: str, prep: Prepared, dim: int, **kw) -> torch.nn.Module:
    """A fresh model of `name` (one of MODELS) sized for `prep`."""
    if name in ("mf", "mf-nobias"):
        return MF(prep.n_users, prep.n_items, dim, bias=name == "mf")
    if name == "lightgcn":
        tr = prep.inter.of_split("train")
        keep = tr.label == 1 if kw.get("graph", "pos") == "pos" else np.ones(len(tr), bool)
        adj = normalized_adjacency(tr.user[keep], tr.item[keep], prep.n_users, prep.n_items)
        return LightGCN(prep.n_users, prep.n_items, dim, adj, n_layers=kw.get("n_layers", 2))
    if name == "sasrec":
        return SASRec(prep.n_items, dim, max_len=kw.get("max_len", MAX_LEN), n_heads=kw.get("n_heads", 2),
                      dropout=kw.get("dropout", 0.0), use_labels=kw.get("use_labels", False),
                      target_query=kw.get("target_query", False), tie_output=kw.get("tie_output", True),
                      n_users=prep.n_users if kw.get("user_emb", False) else 0, user_bias=kw.get("user_bias", False),
                      item_wd=kw.get("item_wd", 1.0))
    raise ValueError(f"unknown CF model {name!r}; choose one of {MODELS}")


@torch.no_grad()
def predict(model, data: RowData, idx: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Logits [len(idx)] in eval mode."""
    model.eval()
    out = [model(data.batch(torch.from_numpy(idx[s:s + batch_size]), model.needs))
           for s in range(0, len(idx), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


@torch.no_grad()
def mf_parts(model, data: RowData, split: str) -> dict:
    """Where an MF model's signal sits on `split`: metrics of its full logit, of its bias terms alone
    (b_u + c_i + g) and of its dot product alone (<P_u, Q_i>, what the CF tokens carry)."""
    idx = torch.from_numpy(data.rows(split))
    u, i, y = data.user[idx], data.item[idx], data.label[idx].numpy()
    dot = (model.user_emb(u) * model.item_emb(i)).sum(-1)
    bias = model.user_bias(u).squeeze(-1) + model.item_bias(i).squeeze(-1) + model.global_bias
    users = u.numpy()
    return {name: evaluate(users, s.numpy(), y) for name, s in (("full", dot + bias), ("biases", bias), ("dot", dot))}


def split_metrics(model, data: RowData, split: str) -> dict:
    idx = data.rows(split)
    return evaluate(data.user[idx].numpy(), predict(model, data, idx), data.label[idx].numpy())


def fit(model, data: RowData, seen_users: torch.Tensor, lr: float, weight_decay: float,
        batch_size: int = CFConfig.batch_size, max_epochs: int = CFConfig.max_epochs,
        patience: int = CFConfig.patience, seed: int = 0, desc: str = "", select: str = "auc",
        progress: bool = True) -> dict:
    """Train `model` in place on the train rows; keep the weights of the epoch with the best valid
    `selection_score(select)` (default: AUC).

    Returns {"valid_auc", "valid_uauc", "valid_score", "best_epoch", "epochs"}. Early stop after `patience`
    epochs without a better valid score. Users without train rows are filled with the mean user
    (model.fill_cold_users) before each evaluation, so selection sees the same cold-start fallback as the exported model.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    # a model may scale the decay per parameter group (SASRec's item_wd): [{"params", "weight_decay"}, ...]
    groups = model.param_groups(weight_decay) if hasattr(model, "param_groups") else model.parameters()
    opt = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    train_idx = torch.from_numpy(data.rows("train"))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    best = {"valid_score": -np.inf, "best_epoch": -1, "state": None}
    bar = tqdm(range(max_epochs), desc=desc, leave=False, mininterval=2.0, disable=not progress)
    for epoch in bar:
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for s in range(0, len(perm), batch_size):
            idx = perm[s:s + batch_size]
            loss = loss_fn(model(data.batch(idx, model.needs)), data.label[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.fill_cold_users(seen_users)
        valid = split_metrics(model, data, "valid")
        score = float(np.nan_to_num(selection_score(valid, select), nan=-np.inf))  # NaN (one label) never wins
        bar.set_postfix(loss=f"{loss.item():.4f}", valid_auc=f"{valid['auc']:.4f}", valid_uauc=f"{valid['uauc']:.4f}")
        if best["state"] is None or score > best["valid_score"]:  # the first epoch counts even if NaN
            best = {"valid_score": score, "valid_auc": valid["auc"], "valid_uauc": valid["uauc"], "best_epoch": epoch,
                    "state": copy.deepcopy(model.state_dict())}
        elif epoch - best["best_epoch"] >= patience:
            break
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return {k: best.get(k, float("nan")) for k in ("valid_auc", "valid_uauc", "valid_score", "best_epoch")} | {
        "epochs": epoch + 1}


# Grids: subsets of the paper's ranges (lr 1e-2/1e-3/1e-4, dim 64/128/256, wd 1e-2..1e-7); "paper" is the
# full cross product (`--grid paper`, not in the 15-minute budget). On ML-1M the MF/LightGCN optimum (lr 1e-2,
# dim 64, wd 1e-4) sits inside their grids; lr 1e-4, dim 128 and wd 1e-2 / 1e-7 are left out for time.
# Timing (bench/baselines.py, 1 thread, 2026-11-22): MF 16 configs 35 s CPU, LightGCN 16 configs 83 s, SASRec
# ~45 s per config; the old 2-thread default spent most of a 30-minute run spin-waiting on a loaded box.
# SASRec (lr 1e-3, D 64; the sweep is in sasrec.py) takes SASRec's own input, the item sequence without
# the rating labels; over wd {1e-2, 1e-3, 1e-4} valid AUC picks 1e-3 (~35 s per config).
GRIDS = {
    "paper": {"lr": [1e-2, 1e-3, 1e-4], "dim": [64, 128, 256], "weight_decay": [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]},
    "mf": {"lr": [1e-2, 1e-3], "dim": [64, 256], "weight_decay": [1e-3, 1e-4, 1e-5, 1e-6]},
    "mf-nobias": {"lr": [1e-2, 1e-3], "dim": [64, 256], "weight_decay": [1e-3, 1e-4, 1e-5, 1e-6]},
    "lightgcn": {"lr": [1e-2, 1e-3], "dim": [64, 256], "weight_decay": [1e-3, 1e-4, 1e-5, 1e-6]},
    "sasrec": {"lr": [1e-3], "dim": [64], "weight_decay": [1e-2, 1e-3, 1e-4]},
}

# Default build_model options and selection rule per model: valid AUC, the issue's rule, for all three.
# The official ThinkRec rule AUC/4 + UAUC/3 (select="official") was measured for SASRec and is not the
# default: it picks noisier epochs and did not raise test UAUC (sasrec.py's sweep).
MODEL_KW: dict = {"sasrec": {}}
SELECT = {"mf": "auc", "lightgcn": "auc", "sasrec": "auc", "mf-nobias": "auc"}


def search(name: str, prep: Prepared, grid: dict, seed: int = 0, data: RowData | None = None,
           model_kw: dict | None = None, **fit_kw):
    """Fit every configuration of `grid` ({"lr": [...], "dim": [...], "weight_decay": [...]}); return
    (best model, best config, list of per-configuration results). Ties keep the earlier configuration.
    `model_kw` (build_model options) defaults to MODEL_KW[name], fit's `select` to SELECT[name]."""
    model_kw = dict(MODEL_KW.get(name, {}) if model_kw is None else model_kw)
    fit_kw.setdefault("select", SELECT.get(name, "auc"))
    if data is None:
        data = row_data(prep.inter, prep.n_items, MAX_LEN if name == "sasrec" else 0)
    seen = torch.zeros(prep.n_users, dtype=torch.bool)
    seen[data.user[data.rows("train")]] = True
    best, results = None, []
    keys = ("lr", "dim", "weight_decay")
    for values in itertools.product(*(grid[k] for k in keys)):
        cfg = dict(zip(keys, values))
        torch.manual_seed(seed)
        model = build_model(name, prep, cfg["dim"], **model_kw)
        t = time.perf_counter()
        res = fit(model, data, seen, cfg["lr"], cfg["weight_decay"], seed=seed, desc=f"{name} {cfg}", **fit_kw)
        res = {**cfg, **res, "select": fit_kw["select"], "model_kw": model_kw,
               "seconds": round(time.perf_counter() - t, 2)}
        results.append(res)
        if best is None or res["valid_score"] > best[1]["valid_score"]:
            best = (model, res)
    return best[0], best[1], results, data


def save(run_dir, name: str, model, prep: Prepared, info: dict) -> Path:
    """RUN/cf/<name>.json (config, selection, metrics, id maps: position = index), then
    RUN/cf/<name>.safetensors (user_emb [n_users, D], item_emb [n_items, D], biases): the tensors mark a
    complete export, so they are written last. Both atomic."""
    out = Path(run_dir) / "cf"
    if name == "sasrec":
        tensors = model.export(*user_train_histories(prep.inter, prep.n_users, prep.n_items, model.max_len))
    else:
        tensors = model.export()
    tensors = {k: v.detach().float().contiguous() for k, v in tensors.items()}
    meta = {**info, "model": name, "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "user_ids": [str(u) for u in prep.users],
            "item_ids": [str(it.get("raw_id", i)) for i, it in enumerate(prep.items)]}
    write_json(out / f"{name}.json", meta)
    atomic_write_bytes(out / f"{name}.safetensors", st_save(tensors, metadata={"model": name}))
    return out / f"{name}.safetensors"


def export_scores(cf: dict, users, items) -> np.ndarray:
    """A CF export's own logits <u, i> + b_u + c_i + g (the terms it has) for (user, item) index pairs."""
    u, i = torch.as_tensor(np.asarray(users)), torch.as_tensor(np.asarray(items))
    s = (cf["user_emb"][u] * cf["item_emb"][i]).sum(-1).double()
    for key, idx in (("user_bias", u), ("item_bias", i)):
        if key in cf:
            s += cf[key][idx].double()
    if "global_bias" in cf:
        s += float(cf["global_bias"].reshape(-1)[0])
    return s.numpy()


def load_embeddings(run_dir, name: str, need=("user_emb", "item_emb")) -> dict:
    """{tensor name: float32 CPU tensor} of RUN/cf/<name>.safetensors (user_emb [n_users, D], item_emb
    [n_items, D], biases). FileNotFoundError when the CF model was not trained; ArtifactError (one line:
    the file and what to delete) when it is damaged or lacks one of `need`."""
    path = Path(run_dir) / "cf" / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `python -m thinkrec.cf train --cf-model {name} --run-dir {run_dir}`")
    redo = f"delete it to retrain the CF model {name}"
    tensors = read_safetensors(path, redo)
    require_keys(path, tensors, need, redo)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    rows = {who: (shapes.get(f"{who}_emb") or (None,))[0] for who in ("user", "item")}  # None: not in the file
    fits = (all(v.dtype == torch.float32 for v in tensors.values())
            and all(len(shapes.get(f"{who}_emb", (0, 0))) == 2 for who in rows)
            and len({shapes[k][1] for k in ("user_emb", "item_emb") if k in shapes}) <= 1
            and all(n is None or shapes.get(f"{who}_bias", (n,)) == (n,) for who, n in rows.items())
            and shapes.get("global_bias", (1,)) == (1,))
    if not fits:
        raise ArtifactError(f"{path} is not a CF export (float32 user_emb [users, D], item_emb [items, D], user_bias "
                            f"[users], item_bias [items], global_bias [1]; it holds "
                            f"{ {k: (str(v.dtype).removeprefix('torch.'), shapes[k]) for k, v in tensors.items()} }); "
                            f"{redo}")
    return tensors


def train_cf(run_dir, cfg: CFConfig) -> dict:
    """Grid-search cfg.model on the prepared RUN/data, export the selected model to RUN/cf/<model>.* (`save`);
    return the info written to RUN/cf/<model>.json (config, grid, selected, results, valid/test metrics)."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown CF model {cfg.model!r}; choose one of {MODELS}")
    torch.set_num_threads(cfg.threads)
    prep = load_prepared(run_dir)
    grid = dict(GRIDS[cfg.grid or cfg.model])
    for key in ("lr", "dim", "weight_decay"):
        if getattr(cfg, key) is not None:
            grid[key] = [getattr(cfg, key)]
    model_kw = {"use_labels": True} if cfg.sasrec_labels and cfg.model == "sasrec" else None  # None: MODEL_KW
    t = time.perf_counter()
    model, best, results, data = search(cfg.model, prep, grid, seed=cfg.seed, batch_size=cfg.batch_size,
                                        max_epochs=cfg.max_epochs, patience=cfg.patience, model_kw=model_kw,
                                        progress=cfg.progress,
                                        **({"select": cfg.select} if cfg.select else {}))
    args = {k: v for k, v in asdict(cfg).items() if k != "progress"}  # how it was shown changes no number
    info = {"args": {"run": str(run_dir), **args}, "grid": grid, "selected": best, "results": results,
            "valid": split_metrics(model, data, "valid"), "test": split_metrics(model, data, "test"),
            "seconds": round(time.perf_counter() - t, 1)}
    path = save(run_dir, cfg.model, model, prep, info)
    print(to_json({"model": cfg.model, "selected": best, "valid": info["valid"], "test": info["test"],
                   "saved": str(path)}))
    return info
