"""Train ThinkRec end to end: data -> CF model -> groups and gate -> stage 1 -> stage 2 -> stage 3 -> test.

    python train.py                                        # offline default: ml100k, SmolLM2-135M, small samples
    python train.py --dataset ml1m --experts 2 --run-dir runs/ml1m
    python train.py --dataset csv --data-dir ../shared/data/ml1m-collm --run-dir runs/ml1m-collm
    python train.py --run-dir runs/ml100k --resume         # continue a killed run where it stopped
    torchrun --nproc-per-node 4 train.py --dataset ml1m --model HuggingFaceTB/SmolLM2-135M-Instruct

Every phase writes its artifact into --run-dir atomically and is skipped when that artifact exists:
data/ (prepared interactions), cf/mf.safetensors, experts/groups.safetensors, stage1/, stage2/, stage3/
(adapters.safetensors + adapters.json), then metrics.json (test AUC, UAUC, NDCG@5, MAP@5, routing counts).
With --resume a stage interrupted midway continues from its checkpoint (RUN/<stage>/ckpt/).

Reproducible: every random draw derives from --seed and the phase (LoRA and projector initialisation,
dropout per stage, sampling, clustering, CF), whichever phases this process ran, so a run killed anywhere
and continued with --resume ends with the same artifacts, bit for bit, as one never stopped. One live run
per directory (RUN/.lock). Bad arguments, a missing model and unusable data stop the run before the long
work, with one line and exit status 2.
"""

import argparse
import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from thinkrec import precision
from thinkrec import recipe as recipes
from thinkrec import stages
from thinkrec.model import fused
from thinkrec.cf import CFConfig, train_cf
from thinkrec.cf import likerate
from thinkrec.cf.train import MODELS as CF_MODELS
from thinkrec.cf.train import export_scores, load_embeddings
from thinkrec.data import load_prepared, prepare
from thinkrec.data.history import HISTORY_RULES
from thinkrec.data.prepared import SPLITS
from thinkrec.data.prompts import TITLE_STYLES, load_keywords, slotted, with_titles
from thinkrec.data.tokenize import DEFAULT_MAX_LEN, QUICK_MAX_LEN, PromptBuilder, default_max_len
from thinkrec.errors import UsageError, UserError, number, run_cli
from thinkrec.experts import (CLUSTER_METHODS, GroupConfig, build_groups, load_groups, small_groups, table_router,
                              train_table)
from thinkrec.infer import LoadedRun, score_rows, split_rows
from thinkrec.infer.rows import official_sample
from thinkrec.infer.run import stage_gate
from thinkrec.io import RunLock, clean_stale_temps, read_json, to_json, write_json
from thinkrec.metrics import evaluate
from thinkrec.model import LoRAConfig, ThinkRecLM, load_adapters, resolve_model, save_adapters
from thinkrec.model import lowp
from thinkrec.model.projector import CF_INPUTS, CF_SLOTS, cf_token_tables, token_report
from thinkrec.precision import TRAIN_PRECISIONS
from thinkrec.recipe import RECIPES
from thinkrec.rundir import RunDir, config_of
from thinkrec.runtime import quiet_progress, tune_malloc
from thinkrec.train import (STAGES, LoopConfig, SampleSet, StageInputs, init_from_env, is_done, read_traces,
                            setup, stage_dir, subsample, train_stage)
from thinkrec.train.ddp import shutdown
from thinkrec.train.loop import derive_seed
from thinkrec.train.stages import EXPERT_LAYERS


def stage_rows(text: str | None) -> dict:
    """--stage-rows "stage3=512,stage2=2048" -> {"stage2": 2048, "stage3": 512} ({} for None)."""
    out = {}
    for part in filter(None, (x.strip() for x in (text or "").split(","))):
        name, eq, n = part.partition("=")
        if not eq or name not in STAGES or not n.isdigit():
            raise argparse.ArgumentTypeError(f"{part!r}: expected STAGE=N with STAGE one of {', '.join(STAGES)} "
                                             f"and N >= 0 rows (0 = all)")
        out[name] = int(n)
    return {st: out[st] for st in STAGES if st in out}


def _stage_rows(text: str) -> str:
    """The argument checked and written the one way (stage order), as the run records it."""
    return ",".join(f"{k}={v}" for k, v in stage_rows(text).items())


def _experts(text):
    if text == "auto":
        return text
    return number(int, 1)(text)


def _data_args(p) -> None:
    """Data, rows and prompts: what each stage reads."""
    p.add_argument("--recipe", default=None, choices=RECIPES,
                   help="ours (default), or official: the authors' released code reproduced (verbatim prompts and "
                        "answers, their history rule, titles, grouping, stage-3 prompt and selection, schedule, "
                        "early stopping and validation sample; see the recipe table in docs/data.md). The flags below "
                        "that name a point (--history, --titles, --cluster, --stage3-select, --lr, ...) override "
                        "it. A run keeps the recipe it started with (RUN/recipe.json)")
    p.add_argument("--dataset", default="ml100k", help="ml100k | ml1m | amazon-book | yelp | csv")
    p.add_argument("--data-dir", default=None, help="raw files (default: download / the offline mirror)")
    p.add_argument("--noun", default=None, help="what the prompts call an item (default: movie for ml1m/ml100k, book, "
                   "business; item for csv: pass --noun movie for the paper's ML-1M split)")
    p.add_argument("--run-dir", default=None, help="where every artifact goes (default runs/<dataset>)")
    p.add_argument("--max-train-samples", type=number(int, 0), default=64, help="training rows per stage (0 = all)")
    p.add_argument("--stage-rows", type=_stage_rows, default=None, metavar="STAGE=N,...",
                   help="training rows of some stages instead of --max-train-samples, e.g. stage2=2048 (the CF "
                        "projector learns from more rows than 512: docs/results.md)")
    p.add_argument("--max-eval-samples", type=number(int, 0), default=48, help="valid rows scored per evaluation (0 = all)")
    p.add_argument("--max-test-samples", type=number(int, 0), default=160, help="test rows scored at the end (0 = all)")
    p.add_argument("--test-rows", default="split", choices=["split", "official"],
                   help="which test rows the end scores: the test split, or the official evaluation's 25%% sample of "
                        "it (1,833 rows on the paper's ML-1M split); --max-test-samples caps either")
    p.add_argument("--max-len", type=number(int, 16), default=None,
                   help="tokens per sample; older history items are dropped beyond it (the run says how many rows "
                        f"lose some). Default {DEFAULT_MAX_LEN}, which keeps every ML-1M prompt whole (the longest, "
                        f"with ids, is 443 tokens); {QUICK_MAX_LEN} for the quick offline ml100k default")
    p.add_argument("--history", default=None, choices=HISTORY_RULES,
                   help="which earlier interactions a prompt shows: strict (an earlier timestamp; ours) or file (also "
                        "earlier rows of the same second, the official code's rule; it can show a test row the "
                        "label of another test row rated in the same second)")
    p.add_argument("--titles", default=None, choices=TITLE_STYLES,
                   help="item titles in prompts: full (ours), or no-year (the official code's ML-1M titles)")
    p.add_argument("--traces", default=None, help="reasoning traces JSON Lines (default RUN/reasoning/traces.jsonl "
                   "when it exists; without traces every sample is a plain Yes/No one)")
    p.add_argument("--keywords", default=None, help="item keywords JSON Lines (default RUN/data/keywords.jsonl if any)")


def _model_args(p) -> None:
    """The LLM, the CF model, groups and CF tokens, and which stages run."""
    p.add_argument("--model", default=None, help="HF id, local dir or .gguf (default SmolLM2-135M-Instruct, offline)")
    p.add_argument("--experts", type=_experts, default=2,
                   help="number of user groups / LoRA experts N, or 'auto': N in 2..10 by silhouette")
    p.add_argument("--cluster", default=None, choices=CLUSTER_METHODS,
                   help="user grouping: spherical k-means of the training users (cosine, as the gate routes; ours), "
                        "raw-L2 k-means, or standard-scaled Ward (the official recipe clusters all users so)")
    p.add_argument("--min-group-share", type=number(float, 0), default=GroupConfig.min_share,
                   help="stop before training when a group holds fewer of the training users than this")
    p.add_argument("--allow-small-groups", action="store_true", help="train experts on small groups anyway")
    p.add_argument("--cf-model", default="mf", choices=list(CF_MODELS),
                   help="the CF model of the CF tokens and the user groups (mf-nobias: CoLLM's MF, no bias terms)")
    p.add_argument("--cf-dim", type=number(int, 1), default=256, help="CF embedding size (official 256)")
    p.add_argument("--cf-inputs", default=None, choices=CF_INPUTS,
                   help="what the CF tokens carry: emb+bias ([P_u, b_u] / [Q_i, c_i]: the CF model's biases too) or "
                        "emb (the embeddings alone, the official code's)")
    p.add_argument("--cf-scale", default=None, choices=["token", "held", "none"],
                   help="token: standardise the projector's inputs and start its outputs at a token embedding's "
                        "norm; held: the same, and every output kept at that norm through training; none: raw "
                        "inputs and default init (the official code's)")
    p.add_argument("--cf-slots", default=None, choices=CF_SLOTS,
                   help="which prompt items carry a CF token: all (every history item, the user and the target; the "
                        "paper's) or two (the user and the target only: CoLLM's prompt)")
    p.add_argument("--train-prompt", default=None, choices=["ids", "c3"],
                   help="prompt of stages 2-3's plain samples: c3 (the recommendation prompt that selection and "
                        "test score) or ids (the stage-2 prompt)")
    p.add_argument("--expert-layers", type=number(int, 1), default=EXPERT_LAYERS, help="stage 3 trains the LoRA of this many last layers")
    p.add_argument("--stage3-select", default=None, choices=["joint", "group"],
                   help="stage 3 model selection: one criterion over all valid rows (joint), or each expert keeps "
                        "the parameters that were best on its own group's valid rows (group, the official way)")
    p.add_argument("--last-stage", default=STAGES[-1], choices=STAGES,
                   help="stop after this stage and test with its adapters: stage1 (a TALLRec-style run: LoRA on "
                        "prompts without ids), stage2 (CoLLM-style: plus the CF projector), stage3 (ThinkRec's "
                        "experts); before stage 3 every user has the global adapter")
    p.add_argument("--prefix-cache-mb", type=number(float, 0), default=4096,
                   help="stage 3 keeps the frozen layers' output per sample up to this many MB, so epochs after "
                        "the first run only the trainable layers (0 = recompute every step)")


def _schedule_args(p) -> None:
    """Optimisation, evaluation, precision and how the run is driven."""
    p.add_argument("--epochs", type=number(float, 0, inclusive=False), default=LoopConfig.epochs, help="passes over the training rows per stage")
    p.add_argument("--batch-size", type=number(int, 1), default=LoopConfig.batch_size, help="rows per micro-batch (all ranks together)")
    p.add_argument("--accum", type=number(int, 1), default=LoopConfig.accum, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=number(float, 0, inclusive=False), default=None,
                   help=f"AdamW peak learning rate of stages 1 and 2 (default {LoopConfig.lr}, as the official configs)")
    p.add_argument("--stage2-lr", type=number(float, 0, inclusive=False), default=None,
                   help="stage 2 (the CF projector alone) learning rate (default --lr; CoLLM trains its projector at "
                        "1e-3 on ML-1M)")
    p.add_argument("--stage3-lr", type=number(float, 0, inclusive=False), default=None,
                   help="stage 3 learning rate (default --lr; the official recipe 1e-5, rising to 8e-5)")
    p.add_argument("--iters-per-epoch", type=number(int, 0), default=None,
                   help="micro-batches per epoch: 0 = one pass over the training rows (ours), the official 800")
    p.add_argument("--weight-decay", type=number(float, 0), default=LoopConfig.weight_decay)
    p.add_argument("--warmup", type=number(int, 0), default=LoopConfig.warmup, help="warmup steps (capped at 10%% of a stage's steps)")
    p.add_argument("--eval-every", type=number(int, 0), default=None,
                   help="optimizer steps between valid evaluations (0 = at the end; default 0, the official recipe "
                        "once per epoch)")
    p.add_argument("--patience", type=number(int, 1), default=LoopConfig.patience, help="evaluations without improvement before stopping")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (less memory, ~30%% slower)")
    p.add_argument("--precision", default=None, choices=TRAIN_PRECISIONS,
                   help="arithmetic of the frozen LLM: bf16 (frozen weights bf16, LoRA and optimizer fp32), fp32, or "
                        "auto (bf16 on CUDA, and on a CPU with native bf16 whose once-measured bf16 GEMMs are >= 1.5x "
                        "fp32; the decision is cached per machine). Default: the "
                        "precision the run started with (RUN/precision.json), else auto")
    p.add_argument("--seed", type=number(int, 0), default=LoopConfig.seed)
    p.add_argument("--threads", type=number(int, 0), default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--fused-ops", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="compile the element-wise ops of each layer (RMSNorm, SiLU * up, RoPE) with torch.compile on "
                        "CPU (needs a C++ compiler): 3-12 s of compiling once per process, then a bf16 step 1.18-1.25x "
                        "faster, an fp32 step 1.01-1.12x (a 2-core Xeon with AMX, bench/train_step.py --compile). auto "
                        "(default): on for bf16 training on a CPU when the run plans >= 48 steps (it pays back within "
                        "10-40), eager where it cannot compile; off at fp32, where it may not pay back in a short run. "
                        "on: also at fp32, and a machine that cannot compile stops with an error")
    p.add_argument("--share-prefix", action="store_true",
                   help="draw rows of one user with one history (rated in the same second) into the same batch and "
                        "compute their common prompt prefix once (the loss is unchanged; batches are drawn by group, "
                        "so a run differs from one without it). Padding-free models; off with stage 3's prefix cache")
    p.add_argument("--ckpt-minutes", type=number(float, 0, inclusive=False), default=LoopConfig.ckpt_minutes,
                   help="save a mid-stage checkpoint at least this often (also every 10 steps and at each evaluation)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage from RUN/<stage>/ckpt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _data_args(p.add_argument_group("data, rows and prompts"))
    _model_args(p.add_argument_group("model, CF tokens and stages"))
    _schedule_args(p.add_argument_group("schedule, precision and running"))
    args = p.parse_args(argv)
    args.run_dir = Path(args.run_dir or f"runs/{args.dataset}")
    if args.max_len is None:
        args.max_len = default_max_len(args.dataset)
    return args



def apply_recipe(args) -> recipes.Recipe:
    """Resolve --recipe (or the run's own, RUN/recipe.json) and fill every point not given as a flag."""
    rec = recipes.for_run(args.run_dir, args.recipe)
    args.recipe = rec.name
    for flag, value in (("history", rec.history), ("titles", rec.titles), ("cluster", rec.cluster),
                        ("stage3_select", rec.stage3_select), ("iters_per_epoch", rec.iters_per_epoch),
                        ("cf_inputs", rec.cf_inputs), ("cf_scale", rec.cf_scale), ("train_prompt", rec.train_prompt),
                        ("cf_slots", rec.cf_slots)):
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.eval_every is None:  # the official recipe validates once per epoch
        args.eval_every = max(1, args.iters_per_epoch // args.accum) if rec.name == "official" else 0
    return rec


def stage_schedule(args, rec: recipes.Recipe, stage: str) -> dict:
    """LoopConfig's learning-rate fields of one stage: its own rate flag (--stage2-lr, --stage3-lr), else --lr,
    over the recipe's schedule (a stage that does not follow --lr keeps the schedule's rate)."""
    st = stages.get(stage)
    sched = (rec.stages or {}).get(stage)
    lr = getattr(args, st.lr_flag) if st.lr_flag else None
    if not lr:
        lr = sched.lr if sched and not st.follows_lr else args.lr or (sched.lr if sched else LoopConfig.lr)
    if sched is None:
        return {"lr": lr}
    return {"lr": lr, "min_lr": sched.min_lr, "warmup_lr": sched.warmup_lr}


def log(*a):
    print(*a, flush=True)


def check_paths(args) -> None:
    """The given inputs exist and the run directory is writable."""
    for flag, path in (("--data-dir", args.data_dir), ("--traces", args.traces), ("--keywords", args.keywords)):
        if path is not None and not Path(path).exists():
            raise UsageError(f"{flag} {path}: no such file or directory")
    try:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.run_dir).close()
    except OSError as e:
        raise UsageError(f"--run-dir {args.run_dir} is not writable ({e.strerror})") from None


def check_data(prep, args) -> None:
    """Every split has rows and there are at least as many training users as expert groups."""
    counts = np.bincount(prep.inter.split, minlength=len(SPLITS))
    for name, n in zip(SPLITS, counts):
        if n == 0:
            raise UsageError(f"{args.run_dir / 'data'}: the {name} split has no rows (rows per split: "
                             f"{dict(zip(SPLITS, counts.tolist()))}); ThinkRec needs train, valid and test rows")
    n_users = len(np.unique(prep.inter.user[prep.inter.split == 0]))
    if args.experts != "auto" and args.experts > n_users:
        raise UsageError(f"--experts {args.experts} is more than the {n_users} users with training rows")


def check_groups(groups: dict, args) -> int:
    """The number of groups N; stops when RUN/experts/ holds another N than --experts, or when a group is
    under --min-group-share of the training users (unless --allow-small-groups)."""
    labels = groups["labels"]
    sizes = np.bincount(labels[labels >= 0], minlength=len(groups["centroids"]))
    where = args.run_dir / "experts"
    if args.experts != "auto" and len(sizes) != args.experts:
        raise UsageError(f"{where}/ holds {len(sizes)} groups but --experts is {args.experts}; delete {where}/ "
                         f"and the stage directories to regroup")
    small = small_groups(sizes, args.min_group_share)
    if small and not args.allow_small_groups:
        shares = ", ".join(f"group {g}: {sizes[g]} users ({sizes[g] / sizes.sum():.1%})" for g in small)
        raise UsageError(f"the expert groups have {sizes.tolist()} training users; {shares}, under "
                         f"--min-group-share {args.min_group_share:.0%}: an expert trained on so few users learns "
                         f"little. Try fewer --experts (or --experts auto), another --cf-model or --cluster "
                         f"(delete {where}/ to regroup), or pass --allow-small-groups to go on")
    return len(sizes)


def main(argv=None) -> dict:
    args = parse(argv)
    d = init_from_env()
    if args.no_progress:
        quiet_progress()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fused_ops == "on":
        fused.enable(check=True)
    was_fused = fused.enabled()
    try:
        return _main(args, d)
    finally:
        if not was_fused:  # --fused-ops auto switched them on for this run: an in-process caller gets eager back
            fused.enable(False)


def _main(args, d) -> dict:
    rec = apply_recipe(args)
    with contextlib.ExitStack() as held:
        if d.is_main:
            check_paths(args)
            held.enter_context(RunLock(args.run_dir, "train.py"))
            recipes.record(args.run_dir, rec)
            for path in clean_stale_temps(args.run_dir):
                log(f"removed {path}, left by a killed write")
            log(to_json(RunDir(args.run_dir).write_config(vars(args))))
            resolve_model(args.model)  # a missing model fails now, not after the data and CF phases
            choose_precision(args, d)
        d.barrier()
        metrics = run_pipeline(args, d)
    shutdown(d)
    return metrics


def choose_precision(args, d) -> None:
    """Resolve --precision (or the run's recorded one) and record it in RUN/precision.json, before the long
    work: a precision this device cannot run stops here."""
    prec = precision.for_run(args.run_dir, args.precision, d.device, training=True)
    before = precision.stored(args.run_dir)
    if before is not None and before["name"] != prec.name:
        log(f"precision: the run recorded {before['name']}; stages trained from now on run in {prec.name} "
            f"(finished stages keep their adapters)")
    precision.record(args.run_dir, prec)
    log(f"precision: {prec.describe()}")


def run_precision(args, d) -> precision.Precision:
    """Every rank's precision: the one the main rank recorded."""
    st = precision.stored(args.run_dir)
    return precision.Precision(st["name"], st["requested"], d.device.type, st["reason"], st.get("probe"))


def run_pipeline(args, d) -> dict:
    """The phases, in order; each skips what its artifact in RUN/ already holds."""
    t_start = time.perf_counter()
    p = Pipeline(args, d, recipes.get(args.recipe))
    prepare_data(p)
    cf_and_groups(p)
    build_model(p)
    rows = choose_rows(p)
    stage_info = {st.name: run_stage(p, st, rows) for st in stages.up_to(args.last_stage)}
    test, test_rows = test_phase(p, rows)
    return finish(p, rows, stage_info, test, test_rows, t_start)


@dataclass
class Pipeline:
    """What the phases share: the arguments, the prepared data, the CF model and groups, the model, prompts."""

    args: argparse.Namespace
    d: object  # thinkrec.train.ddp.Dist
    rec: recipes.Recipe
    prep: object = None  # thinkrec.data.Prepared, titles as --titles
    cf: dict = None  # the CF model's export
    user_emb: torch.Tensor = None  # what the CF tokens carry (cf_token_tables), on the device
    item_emb: torch.Tensor = None
    groups: dict = None  # RUN/experts/groups.safetensors
    lm: ThinkRecLM = None
    tok: object = None
    prec: precision.Precision = None
    keywords: dict | None = None
    builders: dict = field(default_factory=dict)

    @property
    def run(self) -> Path:
        return self.args.run_dir

    def log(self, *a) -> None:
        if self.d.is_main:
            log(*a)

    def builder(self, mode, with_ids=None, traces=False) -> PromptBuilder:
        """Plain training prompts ("text", "ids") cut at --max-len; the C.3 scoring prompt ("reason") and
        reasoning samples (`traces`, whose answers are up to 409 tokens) get 409 more, as infer.py scores
        test rows (thinkrec.infer.LoadedRun.builder)."""
        a = self.args
        with_ids = slotted(mode, with_ids, a.cf_slots)  # --cf-slots two: ids on the user and the target only
        key = (mode, with_ids, traces or mode == "reason")
        if key not in self.builders:
            self.builders[key] = PromptBuilder(
                self.prep, self.tok, mode=mode, max_len=a.max_len + (409 if key[2] else 0), keywords=self.keywords,
                placeholder_ids=self.lm.placeholder_token_ids, with_ids=with_ids, history_rule=a.history,
                style=self.rec.prompts)
        return self.builders[key]


@dataclass
class Rows:
    """The rows the stages train and select on, the traces, and the floors on the valid rows."""

    train: dict  # stage -> its training rows
    valid: np.ndarray
    traces: dict  # data row -> reasoning trace
    truncation: dict  # truncation_counts per split
    valid_baselines: dict  # {"cf", "like_rate"}: evaluate() on the valid rows


def prepare_data(p: Pipeline) -> None:
    args, run = p.args, p.run
    if p.d.is_main and not (run / "data" / "stats.json").exists():
        prepare(args.dataset, data_dir=args.data_dir, out=run, noun=args.noun)
    p.d.barrier()
    p.prep = with_titles(load_prepared(run), args.titles)
    if args.noun and p.prep.stats.get("noun") != args.noun:
        raise UsageError(f"{run / 'data'} was prepared with the noun {p.prep.stats.get('noun')!r}, not --noun "
                         f"{args.noun}; delete {run}/ (or use another --run-dir) to prepare it again")
    check_data(p.prep, args)


def cf_and_groups(p: Pipeline) -> None:
    """The CF model (one fixed configuration, no grid search: the LLM stages only read its embeddings) and the
    user groups with their gate."""
    args, run = p.args, p.run
    if p.d.is_main and not (run / "cf" / f"{args.cf_model}.safetensors").exists():
        train_cf(run, CFConfig(model=args.cf_model, lr=1e-3, dim=args.cf_dim, weight_decay=1e-6, max_epochs=30,
                               patience=3, seed=args.seed, threads=torch.get_num_threads(), progress=not args.no_progress))
    if p.d.is_main and not (run / "experts" / "groups.safetensors").exists():
        build_groups(run, GroupConfig(model=args.cf_model, groups=0 if args.experts == "auto" else args.experts,
                                      cluster=args.cluster, users=p.rec.cluster_users, seed=args.seed,
                                      min_share=args.min_group_share))
    p.d.barrier()
    p.cf = load_embeddings(run, args.cf_model)
    tables = cf_token_tables(p.cf, args.cf_inputs)  # what the CF tokens carry
    p.user_emb, p.item_emb = (t.to(p.d.device) for t in tables)  # moved once, indexed per batch
    p.groups = load_groups(run)


def build_model(p: Pipeline) -> None:
    args = p.args
    n_experts = check_groups(p.groups, args)
    torch.manual_seed(derive_seed(args.seed, "model"))  # LoRA A and the projector, whichever phases ran before
    p.lm, p.tok = ThinkRecLM.from_pretrained(args.model, n_experts=n_experts, lora=LoRAConfig(),
                                             cf_dim=p.user_emb.shape[1], cf_inputs=args.cf_inputs,
                                             cf_slots=args.cf_slots, device=p.d.device, prompt_style=p.rec.prompts)
    p.prec = run_precision(args, p.d)
    lowp.apply(p.lm, p.prec)  # bf16: frozen weights stored in bf16; LoRA and projector stay fp32
    auto_fused_ops(args, p)
    kw_path = Path(args.keywords) if args.keywords else RunDir(p.run).keywords
    p.keywords = load_keywords(kw_path, p.prep.items) if kw_path.exists() else None


FUSED_MIN_STEPS = 48  # compile 3-12 s against 0.2-0.5 s saved a bf16 step (docs/architecture.md)


def planned_steps(args, n_train: int) -> int:
    """Optimizer steps the stages up to --last-stage would take from scratch (n_train: the train split's rows)."""
    own = stage_rows(args.stage_rows)
    last = stages.STAGES.index(args.last_stage)
    rows = [own.get(st, args.max_train_samples) or n_train for st in stages.STAGES[:last + 1]]
    return sum(math.ceil(min(r, n_train) * args.epochs / args.batch_size) for r in rows)


def auto_fused_ops(args, p: Pipeline) -> None:
    """--fused-ops auto: the compiled element-wise ops for bf16 training on a CPU when the run is long enough to
    pay back their compile (FUSED_MIN_STEPS; a toy run stays eager); eager, said in the log, where Inductor
    cannot compile."""
    if args.fused_ops != "auto" or fused.enabled() or p.prec.name != "bf16" or p.d.device.type != "cpu":
        return
    steps = planned_steps(args, int((p.prep.inter.split == 0).sum()))
    if steps < FUSED_MIN_STEPS:
        p.log(f"fused ops: off (--fused-ops auto: {steps} training steps would not pay back ~10 s of compiling)")
        return
    try:
        fused.enable(check=True)
        p.log(f"fused ops: on (--fused-ops auto: bf16 training on a CPU, {steps} steps)")
    except UserError as e:
        p.log(f"fused ops: off, eager (--fused-ops auto could not compile them: {e})")


def choose_rows(p: Pipeline) -> Rows:
    args, prep, rec = p.args, p.prep, p.rec
    by_split = {s: np.flatnonzero(prep.inter.split == i) for i, s in enumerate(("train", "valid", "test"))}
    # each stage's rows: its own --stage-rows count, else --max-train-samples (the same draw for equal counts)
    own = stage_rows(args.stage_rows)
    train_rows = {st: subsample(by_split["train"], own.get(st, args.max_train_samples), args.seed) for st in stages.STAGES}
    # validation: a seeded subsample of valid (ours), or of the official 25% sample (official recipe)
    valid_pool = official_sample(prep, args.data_dir, "valid") if rec.valid == "official" else by_split["valid"]
    valid_rows = subsample(valid_pool, args.max_eval_samples, args.seed + 1)
    trace_path = Path(args.traces) if args.traces else RunDir(p.run).traces
    traces = read_traces(trace_path, prep) if trace_path.exists() else {}
    p.log(f"recipe {rec.name}; train rows {', '.join(f'{k} {len(v)}' for k, v in train_rows.items())}, "
          f"valid rows {len(valid_rows)}"
          f"{' (of the official 25% valid sample)' if rec.valid == 'official' else ''}, reasoning traces {len(traces)}")
    every_train_row = np.unique(np.concatenate(list(train_rows.values())))
    truncation = {"max_len": args.max_len, **{name: truncation_counts(p.builder("ids"), rows) for name, rows in
                                              (("train", every_train_row), ("valid", valid_rows))}}
    p.log(truncation_line(truncation, "the stage-2/3 prompt"))
    if not len(valid_rows):
        raise UsageError("no valid rows to select on (--max-eval-samples 0 takes all)")
    # the floors every stage's valid numbers are read against: the CF model and the like rates, on the same rows
    vu, vi, vy = (getattr(prep.inter, k)[valid_rows] for k in ("user", "item", "label"))
    floors = {"cf": evaluate(vu, export_scores(p.cf, vu, vi), vy),
              "like_rate": evaluate(vu, likerate.fit(prep).score(vu, vi), vy)}
    p.log(f"valid rows, the floors to beat: {args.cf_model.upper()} auc {floors['cf']['auc']:.4f} uauc "
          f"{floors['cf']['uauc']:.4f}; like-rate auc {floors['like_rate']['auc']:.4f} uauc "
          f"{floors['like_rate']['uauc']:.4f}")
    return Rows(train_rows, valid_rows, traces, truncation, floors)


def run_stage(p: Pipeline, st: stages.Stage, rows: Rows) -> dict:
    """Train one stage (or load it when RUN/<stage>/ is complete); returns its train.json record."""
    args, lm, out = p.args, p.lm, stage_dir(p.run, st.name)
    if is_done(p.run, st.name):
        load_adapters(lm, out, projector=st.cf_tokens)  # a stage without CF tokens never trained the projector
        p.log(f"[{st.name}] {out} exists: loaded, skipped")
        return read_json(out / "train.json", f"delete {out}/ to train {st.name} again")
    prefix = setup(lm, st.name, args.expert_layers, args.prefix_cache_mb)
    tables = (p.user_emb, p.item_emb)
    tokens = {}
    if st.trains == "projector":  # deterministic from the seeded init, so a resumed stage 2 redoes it identically
        if args.cf_scale in ("token", "held"):
            lm.projector.fit_inputs(tables, median_token_norm(lm))
        if args.cf_scale == "held":
            lm.projector.hold_norm(median_token_norm(lm))
        tokens["start"] = token_report(lm.projector, tables, lm.llm.get_input_embeddings().weight)
    cfg = LoopConfig(epochs=args.epochs, batch_size=args.batch_size, accum=args.accum,
                     **stage_schedule(args, p.rec, st.name), iters_per_epoch=args.iters_per_epoch, stop=p.rec.stop,
                     weight_decay=args.weight_decay, warmup=args.warmup, eval_every=args.eval_every,
                     patience=args.patience, seed=args.seed, grad_ckpt=args.grad_ckpt, share_prefix=args.share_prefix,
                     ckpt_minutes=args.ckpt_minutes, progress=not args.no_progress, desc=st.name)
    t = time.perf_counter()
    torch.manual_seed(derive_seed(args.seed, st.name))  # dropout; a resumed stage takes its checkpoint's RNG
    res = train_stage(lm, stage_inputs(p, st, rows, prefix), cfg, out / "ckpt", p.d, resume=args.resume, log=log)
    info = {"history": res["state"].history, "best_step": res["state"].best_step,
            "best_criterion": res["state"].best_score, "steps": res["state"].step,
            "seconds": round(time.perf_counter() - t, 1)}
    if tokens:
        tokens["end"] = token_report(lm.projector, tables, lm.llm.get_input_embeddings().weight)
        info["tokens"] = tokens
        p.log(f"[{st.name}] CF tokens (norm / median token norm, mean pairwise cosine): " + "; ".join(
            f"{when} users {r['users']['norm_vs_tokens']:.2f} / {r['users']['mean_pairwise_cosine']:.2f}, "
            f"items {r['items']['norm_vs_tokens']:.2f} / {r['items']['mean_pairwise_cosine']:.2f}"
            for when, r in tokens.items()))
    if p.d.is_main:
        write_json(out / "train.json", info)
        save_adapters(lm, out)  # adapters.json last: it marks the stage complete
    p.d.barrier()
    return info


def stage_inputs(p: Pipeline, st: stages.Stage, rows: Rows, prefix) -> StageInputs:
    """The samples a stage trains and selects on, and how its rows are routed."""
    mode = st.prompt_in(p.rec)  # the official recipe's stage 3 uses stage 1's prompt
    # train as you test: stages 2-3 may train on the C.3 prompt that selection and test score
    train_mode = ("reason", True) if mode == "ids" and p.args.train_prompt == "c3" else (mode,)
    table = train_table(p.groups, p.cf["user_emb"].numpy()) if st.routed else None
    valid_groups = (table[p.prep.inter.user[rows.valid]].argmax(1)  # each valid row's expert (adapter index)
                    if st.routed and p.args.stage3_select == "group" else None)
    reason_rows = np.array(sorted(rows.traces), dtype=np.int64)
    return StageInputs(
        # selection scores valid rows with the paper's C.3 prompt, what the evaluation scores (the official
        # code does so too); a stage without CF tokens (stage 1) with C.3 minus its id slots
        plain=SampleSet(p.builder(*train_mode), rows.train[st.name]),
        valid=SampleSet(p.builder("reason", st.cf_tokens), rows.valid),
        # reasoning samples: the C.3 prompt (ours) or the stage's own (official)
        reasoning=SampleSet(p.builder("reason", mode == "ids") if p.rec.reason_prompt == "reason"
                            else p.builder(mode, traces=True), reason_rows, rows.traces) if rows.traces else None,
        route=table_router(table) if st.routed else None, user_emb=p.user_emb, item_emb=p.item_emb, prefix=prefix,
        pad_id=p.tok.pad_token_id, valid_groups=valid_groups)


def test_phase(p: Pipeline, rows: Rows):
    """Score the test rows with the fused model (gate weights per user) through infer.py's scoring path, into
    RUN/infer/; returns (score_rows' result on the main rank, else None; the test rows)."""
    args, prep = p.args, p.prep
    p.lm.set_trainable(layers=[], adapters=[], projector=False)
    pool = official_sample(prep, args.data_dir, "test") if args.test_rows == "official" else None
    test_rows = split_rows(prep, "test", args.max_test_samples, args.seed + 2, rows=pool)
    rows.truncation["test"] = truncation_counts(p.builder("ids"), test_rows.data_row)
    loaded = LoadedRun(p.run, p.lm, p.tok, prep, p.cf, args.cf_model, stage_gate(p.groups["weights"], args.last_stage),
                       stage_dir(p.run, args.last_stage), args.max_len, p.keywords, history=args.history,
                       titles=args.titles, precision=p.prec, style=p.rec.prompts)
    test = None
    if p.d.is_main:
        # the official evaluation's 25% of the test split
        sample = pool if pool is not None else official_sample(prep, args.data_dir, "test")
        official = (np.flatnonzero(np.isin(test_rows.data_row, sample)), "official 25% test sample")
        test = score_rows(loaded, test_rows, RunDir(p.run).infer, TEST_PROMPT,
                          batch_tokens=args.batch_size * 2 * args.max_len, max_rows=2 * args.batch_size,
                          progress=not args.no_progress, overwrite=True, log=log, official_rows=official)
    p.d.barrier()
    return test, test_rows


TEST_PROMPT = "reason"  # the paper's C.3 recommendation prompt, what the official evaluation scores (infer.py's default)


def finish(p: Pipeline, rows: Rows, stage_info: dict, test, test_rows, t_start: float) -> dict:
    """RUN/metrics.json and the summary a user reads at the end."""
    metrics = {"test": test["all"]["thinkrec"] if test else None, "test_cf": test["all"]["cf"] if test else None,
               "test_like_rate": test["all"]["like_rate"] if test else None,
               "test_rows": len(test_rows), "test_official_sample": (test or {}).get("official_sample"),
               "prompt": TEST_PROMPT, "routing": test["routing"] if test else None, "precision": p.prec.to_dict(),
               "truncation": rows.truncation, "valid_baselines": rows.valid_baselines,
               "stages": stage_info, "seconds": round(time.perf_counter() - t_start, 1),
               # what was run, not how it was driven (thinkrec.rundir.config_of), as RUN/config.json has it
               "args": config_of(vars(p.args))}
    if p.d.is_main:
        write_json(RunDir(p.run).metrics, metrics)
        log(summary(metrics, p.args, p.prep))
        log(to_json({"test": metrics["test"], "routing": metrics["routing"], "seconds": metrics["seconds"]}))
    return metrics


def median_token_norm(lm) -> float:
    """The median norm of the LLM's input token embeddings (the CF tokens' target scale)."""
    return float(lm.llm.get_input_embeddings().weight.detach().float().norm(dim=-1).median())


def truncation_counts(builder, rows) -> dict:
    """How many of `rows` lose history items to --max-len, and the longest untruncated prompt."""
    full = builder.untruncated_lengths(rows) if len(rows) else np.zeros(0, np.int64)
    return {"rows": int(len(rows)), "truncated": int((full > builder.max_len).sum()),
            "longest": int(full.max()) if len(full) else 0}


def truncation_line(t: dict, prompt: str) -> str:
    """One line from {"max_len", split: truncation_counts(...)}."""
    splits = {k: v for k, v in t.items() if k != "max_len"}
    longest = max(v["longest"] for v in splits.values())
    if not any(v["truncated"] for v in splits.values()):
        return f"prompts: none over --max-len {t['max_len']} ({prompt}; longest {longest} tokens)"
    parts = ", ".join(f"{k} {v['truncated']} of {v['rows']}" for k, v in splits.items())
    return (f"prompts over --max-len {t['max_len']} ({prompt}), their oldest history items dropped: {parts} rows; "
            f"--max-len {longest} keeps every history whole")


def summary(metrics: dict, args, prep) -> str:
    """What a new user reads at the end: test metrics beside the CF model's on the same rows, routing, and
    whether the run is smoke-sized."""
    n_test = int((prep.inter.split == 2).sum())
    keys = ("auc", "uauc", "ndcg@5", "map@5", "hr@5")
    lines = [f"test: {metrics['test_rows']} of {n_test} test rows, {metrics['prompt']} prompt; routing "
             + ", ".join(f"{k} {v}" for k, v in metrics["routing"].items()),
             f"{'':10}" + "".join(f"{k.upper():>9}" for k in keys)]
    rows = [("ThinkRec", metrics["test"]), (args.cf_model.upper(), metrics["test_cf"]),
            ("like-rate", metrics["test_like_rate"])]
    off = metrics.get("test_official_sample")
    if off and off["rows"]:  # the paper's ML-1M split: the rows the official evaluation scores
        rows += [(f"  on the official 25% sample ({off['rows']} rows):", None), ("ThinkRec", off["thinkrec"]),
                 (args.cf_model.upper(), off["cf"]), ("like-rate", off["like_rate"])]
    for name, m in rows:
        lines.append(name if m is None else f"{name:10}" + "".join(f"{m[k]:9.4f}" for k in keys))
    lines.append("like-rate: each user's and each item's smoothed train-split like rate (no model): the floor any "
                 "recommender must beat")
    caps = {"--max-train-samples": args.max_train_samples, "--max-eval-samples": args.max_eval_samples,
            "--max-test-samples": args.max_test_samples}
    capped = {k: v for k, v in caps.items() if v}
    if capped:
        lines.append("smoke-sized run (" + ", ".join(f"{k} {v}" for k, v in capped.items()) + "): it shows the "
                     "pipeline works, not what ThinkRec reaches; the paper's setting trains and tests on every row: "
                     "python train.py --dataset csv --data-dir ../shared/data/ml1m-collm --noun movie "
                     "--max-train-samples 0 --max-eval-samples 0 --max-test-samples 0")
    if metrics.get("truncation"):
        lines.append(truncation_line(metrics["truncation"], "the stage-2/3 prompt"))
    lines.append(f"scores per row: {args.run_dir / 'infer' / 'scores.jsonl'}; score other rows with "
                 f"python infer.py --run-dir {args.run_dir}")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tune_malloc()  # large activations reuse freed heap blocks instead of fresh pages (thinkrec/runtime.py)
    run_cli("train.py", main)
