"""The training loop shared by the three stages: mixed sampling, accumulation, schedule, evaluation,
best-model selection, early stopping and resumable checkpoints.

Step structure. One optimizer step = `accum` micro-batches; a micro-batch is one global batch of
`batch_size` rows, split over the ranks (thinkrec/train/ddp.py). Micro-batch m draws from the reasoning
set with probability `reason_prob` (when there is one) using the generator seeded by (seed, m), else
from the plain set; each set has its own cursor (epoch, position) in its length-bucketed batch order
(thinkrec/data/sampler.py, deterministic per (seed, epoch)). All randomness is a function of counters
stored in the checkpoint (plus torch's RNG state for dropout), so `resume` continues a killed run to the
same parameters as an uninterrupted one.

Schedule: lr(t) = lr * t / warmup for t < warmup, then lr * (f + (1 - f) * (1 + cos(pi * p)) / 2) with
p the fraction of the remaining steps done and f = min_lr_ratio. AdamW (decoupled weight decay).

Selection: every `eval_every` steps (and after the last) the valid set is scored; the criterion is
AUC/4 + UAUC/3 (the official one; UAUC counts 0 when no user has both labels). The best parameters are
kept; training stops after `patience` evaluations without improvement and the best are restored.
"""

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from thinkrec.data.sampler import LengthBucketSampler
from thinkrec.metrics import evaluate

from . import checkpoint
from .batches import cf_inputs, collate, shard
from .ddp import Dist
from .losses import batch_loss, loss_positions, yes_logits, yes_positions


@dataclass
class LoopConfig:
    epochs: float = 1.0  # passes over the plain training set (micro-batches = epochs * plain batches)
    batch_size: int = 8  # rows per micro-batch, all ranks together
    accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    weight_decay: float = 1e-3
    warmup: int = 200  # steps; capped at 10% of the run
    min_lr_ratio: float = 0.8  # cosine floor, official 1e-4 -> 8e-5
    eval_every: int = 0  # optimizer steps between evaluations; 0 = once at the end
    patience: int = 15  # evaluations without improvement before stopping
    reason_prob: float = 0.2
    seed: int = 0
    max_grad_norm: float = 0.0  # 0 = no clipping (the official recipe clips nothing)
    grad_ckpt: bool = False
    eval_batch_size: int = 16
    ckpt_every: int = 10  # optimizer steps between checkpoints (also after every evaluation and at the end)
    stop_after: int = 0  # testing: return after this many optimizer steps, as if killed (0 = never)
    progress: bool = True
    desc: str = "train"


@dataclass
class StageInputs:
    """What the loop trains on. route(users [B]) -> [B, E] adapter weights or None (global adapter)."""

    plain: object  # SampleSet
    valid: object = None  # SampleSet
    reasoning: object = None  # SampleSet with traces
    route: object = None
    user_emb: torch.Tensor = None
    item_emb: torch.Tensor = None
    forward: object = None  # callable like ThinkRecLM.forward (e.g. FrozenPrefix); default the model
    pad_id: int = 0


@dataclass
class _Cursor:
    epoch: int = 0
    pos: int = 0


@dataclass
class LoopState:
    micro: int = 0
    step: int = 0
    cursors: dict = field(default_factory=lambda: {"plain": [0, 0], "reason": [0, 0]})
    best_score: float = -math.inf
    best_step: int = -1
    evals_since_best: int = 0
    history: list = field(default_factory=list)
    done: bool = False


def lr_at(step: int, total: int, cfg: LoopConfig) -> float:
    warm = min(cfg.warmup, max(1, total // 10))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    p = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def criterion(m: dict) -> float:
    uauc = m.get("uauc", float("nan"))
    auc = m.get("auc", float("nan"))
    return (0.0 if math.isnan(auc) else auc / 4) + (0.0 if math.isnan(uauc) else uauc / 3)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # fp32 on CPU


def _micro_batch(sset, idx, inputs: StageInputs, d: Dist, reasoning: bool):
    """Collate this rank's shard of global batch `idx` (indices into sset) and move it to the device."""
    mine = shard(idx, d.rank, d.world)  # contiguous: idx[lo:lo + len(mine)]
    lo = d.rank * len(idx) // d.world
    samples = [sset.sample(i) for i in idx]  # all rows: global counts for the loss normalisation
    n_tokens = sum(len(s.answer_ids) for s in samples)
    part = samples[lo:lo + len(mine)]
    users = sset.users[np.asarray(mine, dtype=np.int64)] if mine else np.zeros(0, np.int64)
    return collate(part, users, inputs.pad_id, reasoning, n_rows=len(idx), n_tokens=n_tokens).to(d.device)


def _run_forward(lm, inputs: StageInputs, batch, tag: str = None, select=None):
    """Hidden states at `select` = (rows, cols) ([B, T, D] if None); `tag` names the sample set so a
    FrozenPrefix can cache rows by (tag, row)."""
    ue = None if inputs.user_emb is None else inputs.user_emb.to(batch.input_ids.device)
    ie = None if inputs.item_emb is None else inputs.item_emb.to(batch.input_ids.device)
    cf = cf_inputs(batch, ue, ie)
    lm.set_expert_weights(None if inputs.route is None else inputs.route(batch.users).to(batch.input_ids.device))
    fwd = inputs.forward or lm
    kw = {}
    if tag is not None and getattr(fwd, "cache_limit", 0) > 0:
        kw["keys"] = [(tag, int(r)) for r in batch.rows]
    return fwd(batch.input_ids, batch.attention_mask, cf_embeds=cf, placeholder_mask=batch.ph_mask, select=select,
               **kw)


@torch.no_grad()
def score(lm, sset, inputs: StageInputs, d: Dist = Dist(), batch_size: int = 16, progress=False,
          desc="score") -> np.ndarray:
    """Yes logits [len(sset)] for every sample (eval mode, no grad), batched by length; ranks split the
    batches and the scores are summed across ranks (each row is scored by exactly one rank)."""
    was_training = lm.training
    lm.eval()
    order = np.argsort(sset.lengths, kind="stable")
    out = torch.zeros(len(sset), dtype=torch.float64)
    starts = list(range(0, len(order), batch_size))[d.rank::d.world]
    for s in tqdm(starts, desc=desc, disable=not (progress and d.is_main), leave=False):
        idx = order[s:s + batch_size].tolist()
        users = sset.users[np.asarray(idx, dtype=np.int64)]
        batch = collate([sset.sample(i) for i in idx], users, inputs.pad_id).to(d.device)
        with _autocast(d.device):
            h = _run_forward(lm, inputs, batch, tag=f"score-{id(sset)}", select=yes_positions(batch))
        out[idx] = yes_logits(h, lm.lm_head_weight, lm.yes_token_id, batch.yes_col).double().cpu()
    lm.set_expert_weights(None)
    lm.train(was_training)
    return d.all_reduce_sum(out).numpy()


def evaluate_set(lm, sset, inputs: StageInputs, d: Dist = Dist(), batch_size: int = 16, progress=False,
                 desc="eval") -> dict:
    scores = score(lm, sset, inputs, d, batch_size, progress, desc)
    return evaluate(sset.users, scores, sset.labels)


def _next_batch(sampler: LengthBucketSampler, cur: list, cache: dict) -> list:
    """Batch at cursor [epoch, pos] of `sampler`; advances the cursor (wrapping into the next epoch)."""
    epoch, pos = cur
    if cache.get("epoch") != epoch:
        sampler.set_epoch(epoch)
        cache.update(epoch=epoch, batches=sampler.batches())
    batches = cache["batches"]
    b = batches[pos]
    cur[:] = [epoch + 1, 0] if pos + 1 >= len(batches) else [epoch, pos + 1]
    return b


def train_stage(lm, inputs: StageInputs, cfg: LoopConfig, ckpt_dir=None, d: Dist = Dist(), resume=True,
                log=print) -> dict:
    """Train the parameters of `lm` that require grad; returns {"state": LoopState, "best": {name: tensor}
    or None, "interrupted": bool (stop_after hit)}. The best evaluated parameters are left in `lm`.

    ckpt_dir: where mid-stage checkpoints go (None = none). With resume and a checkpoint there, training
    continues from it.
    """
    named = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("thinkrec/train/loop.py train_stage: the model has no trainable parameters")
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    samplers = {"plain": LengthBucketSampler(inputs.plain.lengths, cfg.batch_size, seed=cfg.seed)}
    if inputs.reasoning is not None and len(inputs.reasoning) and cfg.reason_prob > 0:
        samplers["reason"] = LengthBucketSampler(inputs.reasoning.lengths, cfg.batch_size, seed=cfg.seed + 1)
    n_micro = max(1, round(cfg.epochs * len(samplers["plain"])))
    total = math.ceil(n_micro / cfg.accum)
    st, best = LoopState(), None
    if ckpt_dir is not None and resume and checkpoint.exists(ckpt_dir):
        raw, best = checkpoint.load(ckpt_dir, named, opt)
        st = LoopState(**raw)
        log(f"[{cfg.desc}] resumed at step {st.step}/{total} from {ckpt_dir}")
    if cfg.grad_ckpt:
        lm.gradient_checkpointing(True)
    lm.train()
    caches = {k: {} for k in samplers}
    bar = tqdm(total=total, initial=st.step, desc=cfg.desc, disable=not (cfg.progress and d.is_main),
               mininterval=1.0)
    steps_this_run, t0 = 0, time.perf_counter()
    while not st.done and st.step < total:
        lr = lr_at(st.step, total, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        parts = {"loss": 0.0, "bce": 0.0, "lm": 0.0}
        for _ in range(cfg.accum):
            if st.micro >= n_micro:
                break
            rng = np.random.default_rng([cfg.seed, st.micro])
            kind = "reason" if "reason" in samplers and rng.random() < cfg.reason_prob else "plain"
            sset = inputs.reasoning if kind == "reason" else inputs.plain
            idx = _next_batch(samplers[kind], st.cursors[kind], caches[kind])
            batch = _micro_batch(sset, idx, inputs, d, kind == "reason")
            with _autocast(d.device):
                h = _run_forward(lm, inputs, batch, tag=kind, select=loss_positions(batch))
            loss, p, _ = batch_loss(h, lm.lm_head_weight, lm.yes_token_id, batch)
            (loss / cfg.accum).backward()
            parts["loss"] += float(loss.detach()) / cfg.accum
            parts["bce"] += p["bce"] / cfg.accum
            parts["lm"] += p["lm"] / cfg.accum
            st.micro += 1
        d.all_reduce_grads(params)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        st.step += 1
        steps_this_run += 1
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{lr:.2e}")
        last = st.step >= total
        evaluated = inputs.valid is not None and ((cfg.eval_every and st.step % cfg.eval_every == 0) or last)
        if evaluated:
            m = evaluate_set(lm, inputs.valid, inputs, d, cfg.eval_batch_size, cfg.progress, f"{cfg.desc} eval")
            crit = criterion(m)
            st.history.append({"step": st.step, "loss": parts["loss"], "auc": m["auc"], "uauc": m["uauc"],
                               "criterion": crit, "seconds": round(time.perf_counter() - t0, 1)})
            if crit > st.best_score:
                st.best_score, st.best_step, st.evals_since_best = crit, st.step, 0
                best = {n: p.detach().clone() for n, p in named.items()}
            else:
                st.evals_since_best += 1
                st.done = st.evals_since_best >= cfg.patience
            if d.is_main:
                log(f"[{cfg.desc}] step {st.step}/{total} loss {parts['loss']:.4f} valid auc {m['auc']:.4f} "
                    f"uauc {m['uauc']:.4f} (best {st.best_score:.4f} @ {st.best_step})")
        if ckpt_dir is not None and d.is_main and (last or st.done or evaluated
                                                   or st.step % max(1, cfg.ckpt_every) == 0):
            checkpoint.save(ckpt_dir, named, opt, st.__dict__, best)
        d.barrier()
        if cfg.stop_after and steps_this_run >= cfg.stop_after and not last:
            if ckpt_dir is not None and d.is_main:
                checkpoint.save(ckpt_dir, named, opt, st.__dict__, best)
            bar.close()
            return {"state": st, "best": best, "interrupted": True}
    bar.close()
    if cfg.grad_ckpt:
        lm.gradient_checkpointing(False)
    if best is not None:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(best[n])
    lm.set_expert_weights(None)
    return {"state": st, "best": best, "interrupted": False}
