"""A trained run, loaded for inference: the fused model (final adapters, projector), its tokenizer, the
prepared data, the CF tables, the expert groups and the gate's per-user weights.

    RUN/stage3/ (or the last finished stage)   adapters + projector   -> ThinkRecLM
    RUN/cf/<model>.safetensors                 user_emb, item_emb (+ biases: the CF model's own score)
    RUN/experts/groups.safetensors             weights [n_users, E] and route per user (the gate)
    RUN/metrics.json "args"                    how train.py built prompts (max_len, cf_model, keywords)
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from thinkrec import recipe as recipes
from thinkrec.cf.train import export_scores, load_embeddings
from thinkrec.data import load_prepared
from thinkrec.data.prompts import load_keywords, slotted, with_titles
from thinkrec.data.tokenize import PromptBuilder, default_max_len
from thinkrec.errors import UserError
from thinkrec.experts import ROUTE_GLOBAL, ROUTE_MIXTURE, ROUTE_SINGLE, load_groups
from thinkrec.model import LoRAConfig, ThinkRecLM, load_adapters
from thinkrec.model.adapters import read_adapters
from thinkrec.model.lowp import apply as apply_precision
from thinkrec.model.projector import cf_token_tables
from thinkrec.precision import Precision, for_run
from thinkrec.rundir import RunDir
from thinkrec.scoring import score_samples
from thinkrec.stages import STAGES
from thinkrec.stages import get as get_stage

from .rows import split_rows

STAGE_ORDER = STAGES[::-1]  # the last stage first: a run scores with the last one it finished


class RunError(UserError, ValueError):
    """The run directory cannot be scored (nothing trained yet, missing pieces)."""


def train_args(run: Path) -> dict:
    """The arguments train.py ran with, typed (thinkrec.rundir.RunDir.config; {} before any train.py run)."""
    return RunDir(run).config()


def run_arg(args: dict, key: str, default=None):
    """args[key], or `default` where the run did not set it (missing or None)."""
    v = args.get(key)
    return default if v is None else v


def final_stage(run: Path, stage: str | None = None) -> Path:
    """RUN/<stage>, or the last finished stage (STAGE_ORDER)."""
    if stage is not None:
        if stage not in STAGE_ORDER:
            raise RunError(f"--stage {stage!r} is not one of {STAGE_ORDER}")
        if not (run / stage / "adapters.json").is_file():
            raise RunError(f"{run / stage}: not trained (no adapters.json)")
        return run / stage
    for s in STAGE_ORDER:
        if (run / s / "adapters.json").is_file():
            return run / s
    raise RunError(f"{run}: no trained stage (stage1/2/3 with adapters.json); run `python train.py --run-dir {run}`")


def route_names(weights: np.ndarray) -> list:
    """Per row: "global", "expert_k" (one expert, k = 1..N) or "mixture"."""
    out = []
    for w in np.asarray(weights):
        if w[0] == 1.0:
            out.append("global")
        elif w.max() == 1.0:
            out.append(f"expert_{int(w.argmax())}")
        else:
            out.append("mixture")
    return out


@dataclass
class LoadedRun:
    dir: Path
    lm: ThinkRecLM
    tok: object
    prep: object
    cf: dict  # tensors of RUN/cf/<model>.safetensors
    cf_model: str
    gate_weights: np.ndarray  # [n_users, E]
    stage: Path
    max_len: int
    keywords: dict | None
    mix: str = "delta"  # how a mixture combines experts: "delta" (exact) or "linear" (peft's)
    history: str = "strict"  # history rule of the prompts (thinkrec.data.history): "strict" or "file"
    titles: str = "full"  # item titles in prompts (thinkrec.data.prompts.with_titles): "full" or "no-year"
    precision: Precision | None = None  # what the model runs in (lm.precision); None: fp32 as loaded
    style: str = "ours"  # prompt style of the run's recipe (thinkrec.data.prompts.STYLES)

    def builder(self, mode: str, prep=None) -> PromptBuilder:
        """Prompts as the run trained them: mode "ids" (stage 2/3 plain), "reason" (C.3), "text" (stage 1);
        `prep`: the run's data with extra items appended (unknown ids of input rows)."""
        max_len = self.max_len + (409 if mode == "reason" else 0)  # as train.py builds its reasoning prompts
        # a stage without CF tokens (stage 1) never trained the projector: no id slots, as its validation scored
        ids = None if mode != "text" and get_stage(self.stage.name).cf_tokens else False
        if self.lm.projector is not None:  # the slots the run's CF tokens sit on (train.py --cf-slots)
            ids = slotted(mode, ids, self.lm.projector.slots)
        return PromptBuilder(prep or self.prep, self.tok, mode=mode, max_len=max_len, keywords=self.keywords,
                             with_ids=ids, style=self.style,
                             placeholder_ids=self.lm.placeholder_token_ids, history_rule=self.history)

    def token_tables(self) -> tuple:
        """(user table, item table) the CF tokens are projected from, as the run trained them
        (thinkrec.model.projector.cf_token_tables with the projector's `inputs`)."""
        return cf_token_tables(self.cf, self.lm.projector.inputs if self.lm.projector is not None else "emb")

    def mf_scores(self, users, items) -> np.ndarray:
        """The CF model's own logits <u, i> + b_u + c_i + g for (user, item) index pairs."""
        return export_scores(self.cf, users, items)


def stage_gate(weights: np.ndarray, stage: str) -> np.ndarray:
    """The adapter weights [n_users, E] a stage's adapters are scored with: the gate's after stage 3 (where
    the experts train), the global adapter for every user before it."""
    if get_stage(stage).routed:
        return weights
    gate = np.zeros_like(weights)
    gate[:, 0] = 1.0
    return gate


def load_run(run_dir, model=None, mix: str = "delta", max_len: int | None = None, device="cpu",
             precision: str | None = None, stage: str | None = None, history: str | None = None,
             titles: str | None = None, recipe: str | None = None) -> LoadedRun:
    """Load RUN for scoring; `model` overrides the base model recorded with the adapters (a moved cache);
    `precision` (fp32 | bf16 | int8 | auto) overrides the one the run trained in (thinkrec.precision.for_run);
    `history` the history rule and `titles` the title style (default the run's, train.py --history/--titles);
    `recipe` must be the run's own when given (RUN/recipe.json: the prompt style and answer tokens);
    `stage` picks the adapters (default the last finished stage; stage2's are what the official recipe scores
    the training split with to choose the samples for reasoning traces)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(f"--run-dir {run}: no such directory")
    args = train_args(run)
    stage = final_stage(run, stage)
    prec = for_run(run, precision, device, training=False)  # a precision this device lacks fails before loading
    style = recipes.for_run(run, recipe).prompts  # the prompts and answer tokens the run trained with
    cfg, _ = read_adapters(stage)
    cf_model = run_arg(args, "cf_model") or next((m for m in ("mf", "lightgcn", "sasrec")
                                               if (run / "cf" / f"{m}.safetensors").is_file()), "mf")
    cf = load_embeddings(run, cf_model)
    groups = load_groups(run)
    spec = model or (cfg["base_model"] if Path(cfg["base_model"]).is_dir() else run_arg(args, "model"))
    lora = LoRAConfig(r=cfg["r"], alpha=cfg["alpha"], dropout=cfg["dropout"], target_modules=cfg["target_modules"])
    proj = cfg.get("projector") or {}
    lm, tok = ThinkRecLM.from_pretrained(spec, n_experts=cfg["n_experts"], lora=lora, cf_dim=proj.get("cf_dim"),
                                         projector_mid=proj.get("mid", 2560), cf_inputs=proj.get("inputs", "emb"),
                                         cf_slots=proj.get("slots", "all"), mix=mix, device=device, prompt_style=style)
    load_adapters(lm, stage)
    lm.set_trainable(layers=[], adapters=[], projector=False)
    lm.eval()
    titles = titles or run_arg(args, "titles", "full")
    prep = with_titles(load_prepared(run), titles)
    kw_arg = run_arg(args, "keywords")
    kw_path = Path(kw_arg) if kw_arg else RunDir(run).keywords
    keywords = load_keywords(kw_path, prep.items) if kw_path.is_file() else None
    if groups["weights"].shape[1] != lm.n_adapters:
        raise RunError(f"{run}/experts/groups.safetensors gates {groups['weights'].shape[1]} adapters but "
                       f"{stage}/adapters.json has {lm.n_adapters}; delete RUN/experts/ and the stages to retrain")
    loaded = LoadedRun(run, lm, tok, prep, cf, cf_model, stage_gate(groups["weights"], stage.name), stage,
                       int(max_len or run_arg(args, "max_len", default_max_len(prep.stats.get("dataset")))), keywords,
                       mix, history or run_arg(args, "history", "strict"), titles, prec, style)
    apply_precision(lm, prec, calibrate=(lambda: calibration_scores(loaded)) if prec.name == "int8" else None)
    return loaded


CALIBRATION_ROWS = 16  # train rows int8's smoothing measures activation ranges on (docs/precision.md)


def calibration_scores(loaded: LoadedRun, n: int = CALIBRATION_ROWS) -> np.ndarray:
    """Yes logits of n train rows (a fixed draw, reasoning prompts, the rows' own adapter weights) in the
    model's current precision, on CPU: what int8's SmoothQuant calibration runs through the fp32 model."""
    rows = split_rows(loaded.prep, "train", n, seed=0)
    builder = loaded.builder("reason")
    samples = [builder.sample(int(r)) for r in rows.data_row]
    ue, ie = loaded.token_tables()
    w = torch.as_tensor(loaded.gate_weights[rows.user])
    return np.concatenate([score_samples(loaded.lm, samples[i:i + 8], w[i:i + 8], ue, ie, loaded.tok.pad_token_id)
                           for i in range(0, len(samples), 8)])


__all__ = ["LoadedRun", "RunError", "load_run", "route_names", "stage_gate", "train_args", "ROUTE_GLOBAL",
           "ROUTE_SINGLE", "ROUTE_MIXTURE"]
