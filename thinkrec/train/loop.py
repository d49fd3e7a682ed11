"""The training loop shared by the three stages: mixed sampling, accumulation, schedule, evaluation,
best-model selection, early stopping and resumable checkpoints.

Step structure. One optimizer step = `accum` micro-batches; a micro-batch is one global batch of
`batch_size` rows, split over the ranks (thinkrec/train/ddp.py). Micro-batch m draws from the reasoning
set with probability `reason_prob` (when there is one) using the generator seeded by (seed, m), else
from the plain set; each set has its own cursor (epoch, position) in its length-bucketed batch order
(thinkrec/data/sampler.py, deterministic per (seed, epoch)). All randomness is a function of counters
stored in the checkpoint (plus torch's RNG state for dropout), so `resume` continues a killed run to the
same parameters as an uninterrupted one.

Schedule: linear warmup to lr over `warmup` steps (from warmup_lr, or from lr / warmup when warmup_lr is
0), then cosine from lr to min_lr (default min_lr_ratio * lr): lr(p) = min_lr + (lr - min_lr) * (1 +
cos(pi * p)) / 2 with p the fraction of the remaining steps done. AdamW (decoupled weight decay). A
stage runs epochs x (plain batches per pass, or iters_per_epoch micro-batches: the official "epoch").

Selection: every `eval_every` steps (and after the last) the valid set is scored; the criterion is
AUC/4 + UAUC/3 (the official one; UAUC counts 0 when no user has both labels). The best parameters are
kept; training stops after `patience` evaluations without a better criterion (stop="criterion"), or,
the official rule (stop="any"), after more than `patience` evaluations in which neither AUC, UAUC nor
the criterion beat its best; the best parameters are restored.
"""

import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from thinkrec.batches import Batch, cf_inputs, collate, shard
from thinkrec.data.sampler import LengthBucketSampler
from thinkrec.metrics import evaluate, selection_score
from thinkrec.scoring import ScoreJob, plan_batches, run_job

from . import checkpoint
from .data import SampleSet
from .ddp import Dist
from .losses import batch_loss, loss_positions
from .prefix import FrozenPrefix


@dataclass
class LoopConfig:
    epochs: float = 1.0  # passes over the plain training set (micro-batches = epochs * plain batches)
    batch_size: int = 8  # rows per micro-batch, all ranks together
    accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    weight_decay: float = 1e-3
    warmup: int = 200  # steps; capped at 10% of the run
    min_lr_ratio: float = 0.8  # cosine floor, official 1e-4 -> 8e-5
    min_lr: float | None = None  # absolute cosine end (official stage 3: 8e-5 above its lr 1e-5); None: ratio
    warmup_lr: float = 0.0  # where warmup starts (official 1e-5, stage 3 1e-6); 0: lr / warmup
    iters_per_epoch: int = 0  # micro-batches per epoch (official 800); 0: one pass over the plain set
    stop: str = "criterion"  # early stopping: "criterion" or "any" (AUC, UAUC or criterion; official)
    eval_every: int = 0  # optimizer steps between evaluations; 0 = once at the end
    patience: int = 15  # evaluations without improvement before stopping
    reason_prob: float = 0.2
    seed: int = 0
    max_grad_norm: float = 0.0  # 0 = no clipping (the official recipe clips nothing)
    grad_ckpt: bool = False
    share_prefix: bool = False  # rows of one user and history drawn together, their prompt prefix computed once
    eval_batch_size: int = 16
    ckpt_every: int = 10  # optimizer steps between checkpoints (also after every evaluation and at the end)
    ckpt_minutes: float = 2.0  # and at least this often, so a kill loses minutes, not a stage
    progress: bool = True
    desc: str = "train"


@dataclass
class StageInputs:
    """What the loop trains on and how a batch reaches the model."""

    plain: SampleSet  # Yes/No samples
    valid: SampleSet | None = None  # scored for selection and early stopping
    reasoning: SampleSet | None = None  # samples whose answers are reasoning traces
    route: Callable[[torch.Tensor], torch.Tensor] | None = None  # users [B] -> adapter weights [B, E]; None: global
    user_emb: torch.Tensor | None = None  # [n_users, d_cf] for the CF slots
    item_emb: torch.Tensor | None = None  # [n_items, d_cf]
    prefix: FrozenPrefix | None = None  # stage 3's frozen lower layers; None: the model's own forward
    pad_id: int = 0
    # per-group selection (stage 3, the official way): the adapter index (1..N) of each valid row; each
    # expert keeps the parameters that were best on its own group's rows. None: one joint criterion
    valid_groups: np.ndarray | None = None


@dataclass
class LoopState:
    """Everything the loop counts; with the parameters, optimizer and RNG it is a complete checkpoint."""

    micro: int = 0
    step: int = 0
    cursors: dict = field(default_factory=lambda: {"plain": [0, 0], "reason": [0, 0]})  # set -> [epoch, batch]
    best_score: float = -math.inf
    best_step: int = -1
    evals_since_best: int = 0
    history: list = field(default_factory=list)
    done: bool = False
    group_best: dict = field(default_factory=dict)  # per-group selection: {adapter index: [criterion, step]}
    best_auc: float = -math.inf  # stop="any": the best AUC and UAUC seen, each on its own
    best_uauc: float = -math.inf


def derive_seed(seed: int, *names) -> int:
    """A seed for one phase of a run, from (seed, names) alone, so a phase draws the same numbers whichever
    phases ran before it in this process (Python's hash() of a str changes from process to process)."""
    digest = hashlib.sha256(repr((int(seed), *names)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch.manual_seed takes up to 2**63 - 1


def lr_at(step: int, total: int, cfg: LoopConfig) -> float:
    warm = min(cfg.warmup, max(1, total // 10))
    if step < warm:
        if cfg.warmup_lr > 0:
            return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warm
        return cfg.lr * (step + 1) / warm
    p = (step - warm) / max(1, total - warm)
    end = cfg.lr * cfg.min_lr_ratio if cfg.min_lr is None else cfg.min_lr
    return end + (cfg.lr - end) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def _model_inputs(inputs: StageInputs, batch: Batch) -> dict:
    """The forward's keyword arguments besides the token grid: CF vectors of the slots, each row's route."""
    dev = batch.input_ids.device
    ue = None if inputs.user_emb is None else inputs.user_emb.to(dev)
    ie = None if inputs.item_emb is None else inputs.item_emb.to(dev)
    w = None if inputs.route is None else inputs.route(batch.users).to(dev)
    return dict(cf_embeds=cf_inputs(batch, ue, ie), placeholder_mask=batch.ph_mask, expert_weights=w)


def _cache_keys(tag: str, batch: Batch) -> list:
    """What names a row in the frozen prefix's cache: (sample set, data row)."""
    return [(tag, int(r)) for r in batch.rows]


def _forward(lm, inputs: StageInputs, batch: Batch, select=None, cache_tag: str = None):
    """Hidden states at `select` = (rows, cols) ([B, T, D] if None), each row with its route's adapter
    weights. `cache_tag` names the sample set, so the frozen prefix can cache rows by (tag, data row)."""
    kw = _model_inputs(inputs, batch)
    if batch.share is not None:
        kw["share"] = batch.share
    if inputs.prefix is None:
        return lm(batch.input_ids, batch.attention_mask, select=select, **kw)
    keys = None if cache_tag is None else _cache_keys(cache_tag, batch)
    return inputs.prefix(batch.input_ids, batch.attention_mask, select=select, keys=keys, **kw)


def score(lm, sset: SampleSet, inputs: StageInputs, d: Dist = Dist(), batch_size: int = 16, progress=False,
          desc="score") -> np.ndarray:
    """Yes logits [len(sset)] for every sample, through infer.py's scorer (thinkrec.scoring) in batches of
    `batch_size` rows in length order; ranks split the batches and the scores are summed across ranks (each
    row is scored by exactly one rank). Scoring rows stay out of the prefix cache: it fills in training order
    alone."""
    weights = None if inputs.route is None else inputs.route(torch.as_tensor(sset.users))
    job = ScoreJob(sset.sample, sset.lengths, weights, inputs.user_emb, inputs.item_emb, inputs.pad_id)
    units = [(b, None) for b in plan_batches(sset.lengths, sys.maxsize, batch_size)][d.rank::d.world]
    out = run_job(lm, job, units=units, forward=inputs.prefix, progress=progress and d.is_main, device=d.device,
                  desc=desc)
    return d.all_reduce_sum(torch.from_numpy(np.nan_to_num(out, nan=0.0))).numpy()


def adapter_of(name: str):
    """The adapter index a LoRA parameter name belongs to ("....lora_A.2" -> 2), or None."""
    head, _, last = name.rpartition(".")
    return int(last) if head.endswith((".lora_A", ".lora_B")) and last.isdigit() else None


def _select_per_group(st: LoopState, best, named: dict, scores, valid, groups, joint_improved: bool):
    """Per-group selection: the parameters of adapter g are kept from the evaluation where the criterion on
    group g's valid rows was best (the official code trains one group at a time and early-stops each on its
    own rows; this is that selection inside one joint run). Parameters of no group follow the joint
    criterion. Returns (best, whether any group or the joint criterion improved)."""
    best = dict(best or {})
    improved = joint_improved
    present = sorted({int(x) for x in groups})
    for g in present:
        sel = np.asarray(groups) == g
        c = selection_score(evaluate(valid.users[sel], scores[sel], valid.labels[sel]), nan_as_zero=True)
        key = str(g)
        if key not in st.group_best or c > st.group_best[key][0]:
            st.group_best[key] = [c, st.step]
            improved = True
            for n, p in named.items():
                if adapter_of(n) == g:
                    best[n] = p.detach().clone()
    for n, p in named.items():  # no group's own (projector, an adapter without valid rows): the joint criterion
        if adapter_of(n) not in present and (joint_improved or n not in best):
            best[n] = p.detach().clone()
    return best, improved


class MixedSampler:
    """Which rows micro-batch `micro` trains on: the reasoning set with probability reason_prob (a generator
    seeded by (seed, micro)), else the plain set, each at its own cursor [epoch, batch] in its length-bucketed,
    per-epoch batch order. A pure function of (micro, cursors), so a resumed run draws what an unbroken one
    would have."""

    def __init__(self, inputs: StageInputs, cfg: LoopConfig, d: Dist, share: bool = False):
        self.inputs, self.cfg, self.d = inputs, cfg, d
        self.sets = {"plain": inputs.plain}
        if inputs.reasoning is not None and len(inputs.reasoning) and cfg.reason_prob > 0:
            self.sets["reason"] = inputs.reasoning
        self.share = share
        self.samplers = {k: LengthBucketSampler(s.lengths, cfg.batch_size, seed=cfg.seed + i,  # plain: seed, reason: +1
                                                groups=s.prefix_groups if self.share else None)
                         for i, (k, s) in enumerate(self.sets.items())}
        self._epoch = {k: (None, []) for k in self.sets}  # set -> (epoch, that epoch's batch order)

    def micro_batches(self) -> int:
        """Micro-batches the stage runs: epochs x (plain batches per pass, or iters_per_epoch)."""
        return max(1, round(self.cfg.epochs * (self.cfg.iters_per_epoch or len(self.samplers["plain"]))))

    def draw(self, micro: int, cursors: dict):
        """(set name, this rank's shard of the batch) of micro-batch `micro`, advancing cursors[set]."""
        rng = np.random.default_rng([self.cfg.seed, micro])
        kind = "reason" if "reason" in self.sets and rng.random() < self.cfg.reason_prob else "plain"
        epoch, pos = cursors[kind]
        if self._epoch[kind][0] != epoch:
            self.samplers[kind].set_epoch(epoch)
            self._epoch[kind] = (epoch, self.samplers[kind].batches())
        batches = self._epoch[kind][1]
        idx = batches[pos]
        cursors[kind] = [epoch + 1, 0] if pos + 1 >= len(batches) else [epoch, pos + 1]
        # this rank's contiguous shard; the loss divides by the whole batch's rows and answer tokens
        sset = self.sets[kind]
        samples = [sset.sample(i) for i in idx]
        mine = shard(range(len(idx)), self.d.rank, self.d.world)
        return kind, collate([samples[i] for i in mine], sset.users[[idx[i] for i in mine]], self.inputs.pad_id,
                             kind == "reason", n_rows=len(idx),
                             n_tokens=sum(len(s.answer_ids) for s in samples), share=self.share).to(self.d.device)

    def refill_prefix_cache(self, lm, micro: int) -> None:
        """The frozen prefix's cache is not in a checkpoint: refill it from the `micro` batches drawn before, in
        their order, so cached rows hold the same bits as in a run never stopped (it closes when full)."""
        prefix, cursors = self.inputs.prefix, LoopState().cursors
        for m in range(micro):
            if prefix is None or not prefix.caching:
                break
            kind, batch = self.draw(m, cursors)
            with torch.no_grad():
                prefix.warm(batch.input_ids, batch.attention_mask, keys=_cache_keys(kind, batch),
                            **_model_inputs(self.inputs, batch))


class Selection:
    """Scores the valid set every `eval_every` steps and after the last, keeps the best parameters (one joint
    criterion, or per group with `valid_groups`) and decides when to stop (module docstring)."""

    def __init__(self, inputs: StageInputs, cfg: LoopConfig, named: dict, d: Dist, log):
        if cfg.stop not in ("criterion", "any"):
            raise ValueError(f"stop = {cfg.stop!r}, expected 'criterion' or 'any'")
        self.inputs, self.cfg, self.named, self.d, self.log = inputs, cfg, named, d, log

    def due(self, step: int, last: bool) -> bool:
        return self.inputs.valid is not None and bool((self.cfg.eval_every and step % self.cfg.eval_every == 0) or last)

    def __call__(self, lm, st: LoopState, best, loss: float, total: int, t0: float):
        """Evaluate after step st.step; updates st (history, best, counters, done); returns the best parameters."""
        cfg, v, named = self.cfg, self.inputs.valid, self.named
        scores = score(lm, v, self.inputs, self.d, cfg.eval_batch_size, cfg.progress, f"{cfg.desc} eval")
        m = evaluate(v.users, scores, v.labels)
        crit = selection_score(m, nan_as_zero=True)  # AUC/4 + UAUC/3, a NaN part counts 0
        st.history.append({"step": st.step, "loss": loss, "auc": m["auc"], "uauc": m["uauc"],
                           "criterion": crit, "seconds": round(time.perf_counter() - t0, 1)})
        improved = crit > st.best_score
        if improved:
            st.best_score, st.best_step = crit, st.step
        if self.inputs.valid_groups is None:
            if improved:
                best = {n: p.detach().clone() for n, p in named.items()}
        else:
            best, improved = _select_per_group(st, best, named, scores, v, self.inputs.valid_groups, improved)
            st.history[-1]["groups"] = {g: c for g, (c, _) in st.group_best.items()}
        if cfg.stop == "any":  # the official counter: any of AUC, UAUC, criterion improving resets it
            for key, value in (("best_auc", m["auc"]), ("best_uauc", m["uauc"])):
                if value == value and value > getattr(st, key):  # NaN never improves
                    setattr(st, key, value)
                    improved = True
        if improved:
            st.evals_since_best = 0
        else:
            st.evals_since_best += 1
            st.done = st.evals_since_best > cfg.patience if cfg.stop == "any" else st.evals_since_best >= cfg.patience
        if self.d.is_main:
            self.log(f"[{cfg.desc}] step {st.step}/{total} loss {loss:.4f} valid auc {m['auc']:.4f} "
                     f"uauc {m['uauc']:.4f} (best {st.best_score:.4f} @ {st.best_step})")
        return best


class CheckpointClock:
    """Saves a checkpoint every ckpt_every steps or ckpt_minutes, after each evaluation and at the end (when
    does not change what: a checkpoint holds parameters, optimizer, counters and RNG)."""

    def __init__(self, cfg: LoopConfig, ckpt_dir, d: Dist):
        self.cfg, self.dir, self.d = cfg, ckpt_dir, d
        self.last_save = time.perf_counter()

    def after_step(self, st: LoopState, named: dict, opt, best, force: bool) -> None:
        due = st.step % max(1, self.cfg.ckpt_every) == 0 or time.perf_counter() - self.last_save >= 60 * self.cfg.ckpt_minutes
        if self.dir is not None and self.d.is_main and (force or due):
            checkpoint.save(self.dir, named, opt, st.__dict__, best)
            self.last_save = time.perf_counter()
        self.d.barrier()


def _can_share(lm, inputs: StageInputs, log, desc: str) -> bool:
    """Whether training batches may share prompt prefixes: the padding-free forward computes them once, but
    the padded HF forward cannot, and the frozen prefix's cache keeps whole rows (with it, every epoch after
    the first skips the shared part anyway)."""
    why = (f"the model has no padding-free forward ({lm.unpacked_reason})" if not lm.packed
           else "the frozen prefix's cache is on" if inputs.prefix is not None and inputs.prefix.caching else "")
    if why:
        log(f"[{desc}] --share-prefix is off: {why}")
    return not why


def train_stage(lm, inputs: StageInputs, cfg: LoopConfig, ckpt_dir=None, d: Dist = Dist(), resume=True,
                log=print) -> dict:
    """Train the parameters of `lm` that require grad; returns {"state": LoopState, "best": {name: tensor}
    or None}. The best evaluated parameters are left in `lm`.

    ckpt_dir: where mid-stage checkpoints go (None = none). With resume and a checkpoint there, training
    continues from it.
    """
    named = {n: p for n, p in lm.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("the model has no trainable parameters (see ThinkRecLM.set_trainable)")
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    share = cfg.share_prefix and _can_share(lm, inputs, log, cfg.desc)
    sampler = MixedSampler(inputs, cfg, d, share)
    select = Selection(inputs, cfg, named, d, log)
    n_micro = sampler.micro_batches()
    total = math.ceil(n_micro / cfg.accum)

    st, best = LoopState(), None
    if ckpt_dir is not None and resume and checkpoint.exists(ckpt_dir):
        raw, best = checkpoint.load(ckpt_dir, named, opt)
        try:
            st = LoopState(**raw)
        except TypeError as e:  # a renamed or extra key: a damaged or foreign ckpt.json
            raise checkpoint.CheckpointError(f"{ckpt_dir} holds a loop state this code cannot read ({e}); delete "
                                             f"{ckpt_dir}/ to restart the stage") from None
        log(f"[{cfg.desc}] resumed at step {st.step}/{total} from {ckpt_dir}")
        sampler.refill_prefix_cache(lm, st.micro)

    if cfg.grad_ckpt:
        lm.gradient_checkpointing(True)
    lm.train()
    bar = tqdm(total=total, initial=st.step, desc=cfg.desc, disable=not (cfg.progress and d.is_main),
               mininterval=1.0)
    clock = CheckpointClock(cfg, ckpt_dir, d)
    t0 = time.perf_counter()
    while not st.done and st.step < total:
        lr = lr_at(st.step, total, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        # accumulate micro-batches, each from the set the sampler picks, then one step on the gradients
        # summed over ranks
        loss = 0.0
        for _ in range(cfg.accum):
            if st.micro >= n_micro:
                break
            kind, batch = sampler.draw(st.micro, st.cursors)
            h = _forward(lm, inputs, batch, loss_positions(batch), cache_tag=kind)
            micro_loss, _, _ = batch_loss(h, lm.lm_head_weight, lm.yes_token_id, batch)
            (micro_loss / cfg.accum).backward()
            loss += float(micro_loss.detach()) / cfg.accum
            st.micro += 1
        d.all_reduce_grads(params)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        st.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

        last = st.step >= total
        evaluated = select.due(st.step, last)
        if evaluated:
            best = select(lm, st, best, loss, total, t0)
        clock.after_step(st, named, opt, best, force=last or st.done or evaluated)
    bar.close()

    # leave the best evaluated parameters in the model
    if cfg.grad_ckpt:
        lm.gradient_checkpointing(False)
    if best is not None:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(best[n])
    return {"state": st, "best": best}
