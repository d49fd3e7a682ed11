"""Recipes: our defaults ("ours") or the authors' released code reproduced ("official"), one switch.

A recipe is a set of defaults; every point also has its own flag on train.py, which wins over the recipe.
The run stores the recipe and every resolved point (RUN/metrics.json "args"), so `infer.py` and a resumed
run read the prompts, answers and history the run trained with. What each point means:

    point          ours                                    official (the released code)
    prompts        "ours": clean templates, the history     "official": the files verbatim: "high ratings",
                   list "ratings", a real newline, the       the literal two characters \\n, "<s>" as text
                   tokenizer's BOS, " Yes"/" No" answers     (no BOS), "Yes"/"No" right after "#Answer:",
                                                             "Unknow" for an empty history, traces without EOS
    history        strict: earlier timestamps only          file: also earlier rows of the same second
    titles         full                                     no-year (ML-1M)
    stage3_prompt  ids (the stage-2 prompt, CF ids)         text (the stage-1 prompt, no ids)
    reason_prompt  reason (C.3 for every reasoning sample)  stage (each stage's own prompt)
    stage3_select  joint criterion over all valid rows      group: each expert its own group's best
    cluster        spherical k-means of the training users  ward over all users, standard-scaled
    schedule       warmup from 0, cosine to 0.8 lr, stop     warmup from warmup_lr, cosine to min_lr,
                   after `patience` evals without a better   stage-3 rates 1e-5 -> 8e-5, stop after more
                   criterion                                 than `patience` evals without a better AUC,
                                                             UAUC or criterion
    valid          a seeded subsample of valid              the official 25% sample (RandomState(2025))
    cf_inputs      emb+bias: [P_u, b_u] / [Q_i, c_i]        emb: the CF embeddings alone
    cf_scale       held: standardised inputs, tokens at     none: raw inputs, default projector init
                   a token embedding's norm throughout
    cf_slots       two: CF tokens on the user and the       all: on every history item, the user and
                   target only (CoLLM's prompt)             the target
    train_prompt   c3: stages 2-3 train on the C.3 prompt   ids: on the stage-2 prompt (selection and test
                   that selection and test score            score C.3)
    The four CF-token points of ours were chosen together on 256 valid rows of the paper's ML-1M split
    (docs/results.md, "The CF tokens reach the LLM"); each has its flag (--cf-inputs, --cf-scale, --cf-slots,
    --train-prompt).

Why ours differs, point by point, is in docs/data.md's recipe table.
"""

from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from thinkrec.errors import UserError
from thinkrec.io import read_json, write_json

RECIPES = ("ours", "official")


@dataclass(frozen=True)
class Schedule:
    """Learning rates of one stage: linear warmup from warmup_lr to lr, then cosine from lr to min_lr."""

    lr: float
    min_lr: float
    warmup_lr: float


@dataclass(frozen=True)
class Recipe:
    name: str
    prompts: str  # thinkrec.data.prompts.STYLES
    history: str  # thinkrec.data.history.HISTORY_RULES
    titles: str  # thinkrec.data.prompts.TITLE_STYLES
    stage3_prompt: str  # "ids" | "text"
    reason_prompt: str  # "reason" (C.3) | "stage" (the stage's own prompt)
    stage3_select: str  # "joint" | "group"
    cluster: str  # thinkrec.experts.CLUSTER_METHODS
    cluster_users: str  # "train" | "all"
    stop: str  # thinkrec.train.loop: "criterion" | "any" (AUC, UAUC or the criterion)
    valid: str  # "subsample" | "official" (the 25% sample)
    cf_inputs: str = "emb"  # thinkrec.model.projector.CF_INPUTS (the defaults of these four are the official code's)
    cf_scale: str = "none"  # "token" (projector.fit_inputs before stage 2) | "held" (and hold_norm) | "none"
    cf_slots: str = "all"  # thinkrec.model.projector.CF_SLOTS: "all" (the paper's) | "two" (user and target)
    train_prompt: str = "ids"  # stages 2-3 plain samples: "ids" | "c3" (the scoring prompt)
    iters_per_epoch: int = 0  # micro-batches per epoch: 0 = one pass over the training rows; official 800
    stages: dict | None = None  # stage -> Schedule; None: ours (LoopConfig, --lr, --stage3-lr)

    def to_dict(self) -> dict:
        return asdict(self)


OURS = Recipe("ours", prompts="ours", history="strict", titles="full", stage3_prompt="ids", reason_prompt="reason",
              stage3_select="joint", cluster="spherical", cluster_users="train", stop="criterion", valid="subsample",
              cf_inputs="emb+bias", cf_scale="held", cf_slots="two", train_prompt="c3")

# the official configs: stage 1 (and 2) init 1e-4 -> min 8e-5 from warmup 1e-5; stage 3 init 1e-5 -> min 8e-5
# (so the rate rises after warmup) from warmup 1e-6
OFFICIAL = Recipe("official", prompts="official", history="file", titles="no-year", stage3_prompt="text",
                  reason_prompt="stage", stage3_select="group", cluster="ward", cluster_users="all", stop="any",
                  valid="official", iters_per_epoch=800,
                  stages={"stage1": Schedule(1e-4, 8e-5, 1e-5), "stage2": Schedule(1e-4, 8e-5, 1e-5),
                          "stage3": Schedule(1e-5, 8e-5, 1e-6)})


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} is not one of {RECIPES}")
    return OURS if name == "ours" else OFFICIAL


RUN_FILE = "recipe.json"  # RUN/recipe.json: the recipe a run was started with


class RecipeError(UserError, ValueError):
    """A recipe that does not match the run it is asked for."""


def _saved(run_dir) -> dict | None:
    """RUN/recipe.json as written (the name and every point), or None when the run has none."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    redo = f"delete {path} and rerun train.py --resume with the run's --recipe to write it again"
    saved = read_json(path, redo)  # ArtifactError (a UserError) when not UTF-8 JSON
    if not isinstance(saved, dict) or saved.get("name") not in RECIPES:
        raise RecipeError(f"{path}: unreadable; it should hold {{\"name\": one of {RECIPES}}}; {redo}")
    bad = [f.name for f in fields(Recipe) if f.name in saved and not _fits(f, saved[f.name])]
    if bad:
        raise RecipeError(f"{path}: {bad} not of the recipe's types (text, a whole number, stages of "
                          f"{{\"lr\", \"min_lr\", \"warmup_lr\"}}); {redo}")
    return saved


def _fits(f, value) -> bool:
    """Whether a recipe.json value can be point `f` (a Recipe field) as _recorded builds it."""
    if f.name == "stages":
        keys = {g.name for g in fields(Schedule)}
        return value is None or isinstance(value, dict) and all(
            isinstance(v, dict) and v.keys() == keys and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values()) for v in value.values())
    if f.type is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, f.type) if isinstance(f.type, type) else True


def stored(run_dir) -> str | None:
    """The recipe name RUN/recipe.json records, or None (a run from before recipes: "ours")."""
    saved = _saved(run_dir)
    return None if saved is None else saved["name"]


def for_run(run_dir, requested: str | None) -> Recipe:
    """The recipe of a job on RUN: the one it was started with, point by point (a resumed run and infer.py keep
    it), else `requested` (or ours). Asking for another than the run's own stops: a run's stages must share one."""
    saved = _saved(run_dir)
    if saved is None:
        return get(requested or "ours")
    if requested is not None and requested != saved["name"]:
        raise RecipeError(f"{run_dir} was started with --recipe {saved['name']}; pass --recipe {saved['name']} or "
                          f"use another --run-dir")
    return _recorded(saved)


def _recorded(saved: dict) -> Recipe:
    """The recipe a RUN/recipe.json holds: a run keeps the points it started with when a later version changes a
    recipe's defaults. A point the file lacks (a run from before that point existed) takes the dataclass default,
    which is what every run did then; a required point the file lacks, the named recipe's."""
    base = get(saved["name"])
    points = {}
    for f in fields(Recipe):
        if f.name in saved:
            points[f.name] = saved[f.name]
        elif f.default is not MISSING:
            points[f.name] = f.default
        else:
            points[f.name] = getattr(base, f.name)
    if points["stages"] is not None:
        points["stages"] = {k: Schedule(**v) for k, v in points["stages"].items()}
    return Recipe(**points)


def record(run_dir, recipe: Recipe) -> None:
    """Write RUN/recipe.json (the name and every point) when missing."""
    if stored(run_dir) is None:
        write_json(Path(run_dir) / RUN_FILE, recipe.to_dict())
