"""What the experiments run: the pipeline settings, which study reads which, the scales, the paper's numbers.

A setting is one `train.py` run (one directory under RUNS/<scale>/). Studies share settings: ThinkRec
(all stages, traces, 2 experts on MF) is Table 2's last row, the ablation's "full", the experts study's
N = 2 and the grouping study's MF point; CoLLM-style is also the ablation's "w/o both".
"""

from dataclasses import dataclass

from thinkrec.cf.train import GRIDS

METRICS = ("auc", "uauc", "ndcg@5", "map@5")
METRIC_NAMES = {"auc": "AUC", "uauc": "UAUC", "ndcg@5": "NDCG@5", "map@5": "MAP@5"}
CF_MODELS = ("mf", "lightgcn", "sasrec")
CF_NAMES = {"mf": "MF", "lightgcn": "LightGCN", "sasrec": "SASRec"}


@dataclass(frozen=True)
class Setting:
    name: str  # its run directory, RUNS/<scale>/<name>
    last_stage: str  # train.py --last-stage: stage1 (TALLRec-style), stage2 (CoLLM-style), stage3 (ThinkRec)
    traces: bool  # reasoning traces in training (the "think" of ThinkRec)
    cf_model: str = "mf"  # train.py --cf-model: the CF ids and the user grouping
    experts: int = 2  # train.py --experts N


SETTINGS = {s.name: s for s in (
    Setting("tallrec", "stage1", traces=False),
    Setting("collm", "stage2", traces=False),
    Setting("thinkrec", "stage3", traces=True),
    Setting("wo-think", "stage3", traces=False),
    Setting("wo-experts", "stage2", traces=True),
    *(Setting(f"experts-{n}", "stage3", traces=True, experts=n) for n in (1, 3, 4)),
    *(Setting(f"grouping-{m}", "stage3", traces=True, cf_model=m) for m in ("lightgcn", "sasrec")),
)}

# study -> [(row label, setting name)], in the order the rows are shown (and the runs launched)
STUDIES = {
    "table2": [("TALLRec-style", "tallrec"), ("CoLLM-style", "collm"), ("ThinkRec", "thinkrec")],
    "ablation": [("full", "thinkrec"), ("w/o think", "wo-think"), ("w/o experts", "wo-experts"),
                 ("w/o both", "collm")],
    "experts": [(1, "experts-1"), (2, "thinkrec"), (3, "experts-3"), (4, "experts-4")],
    "grouping": [("mf", "thinkrec"), ("lightgcn", "grouping-lightgcn"), ("sasrec", "grouping-sasrec")],
}
# CF models each study trains for its own rows (table2's baselines) besides the settings' --cf-model
STUDY_CF = {"table2": CF_MODELS}


@dataclass(frozen=True)
class Scale:
    train: dict  # train.py flags, by argparse dest
    synth: dict  # python -m thinkrec.reasoning synth flags, by dest (teacher traces; --select random)
    cf_grid: dict | None = None  # one (lr, dim, weight_decay) grid for every CF model; None: each model's own
    cf_epochs: int = 100  # CF max epochs (early stopping on valid AUC, patience 5)


# The scales (what each costs on 2 CPU cores, measured: docs/experiments.md, "Scales and what they cost"):
# cpu-small: 512 training rows per stage, SmolLM2-135M at --precision auto, the official CF-token points;
# cpu-medium: ours (the CF-token levers), 2,048 stage-2 rows, 256 valid rows evaluated every 64 steps;
# paper: the paper's setting, for a GPU: every row, the official recipe (batch 1, 800 iterations per epoch,
# 50 epochs with early stopping after 15 evaluations without gain, the official 25% validation sample and
# per-stage learning rates), the full CF grid of appendix A.2, 2,000 traces;
# tiny: the tests' toy model and data (seconds per run).
SCALES = {
    "cpu-small": Scale(
        train={"max_train_samples": 512, "max_eval_samples": 128, "max_test_samples": 256, "epochs": 1.0,
               "batch_size": 8, "lr": 1e-3, "precision": "auto", "recipe": "ours", "cf_inputs": "emb",
               "cf_scale": "none", "cf_slots": "all", "train_prompt": "ids"},
        synth={"n": 32, "max_tokens": 192, "max_rounds": 3}),
    "cpu-medium": Scale(
        train={"max_train_samples": 512, "stage_rows": "stage2=2048", "max_eval_samples": 256, "eval_every": 64,
               "max_test_samples": 256, "epochs": 1.0, "batch_size": 8, "lr": 1e-3, "precision": "auto",
               "cf_inputs": "emb+bias", "cf_scale": "held", "cf_slots": "two", "train_prompt": "c3"},
        synth={"n": 32, "max_tokens": 192, "max_rounds": 3}),
    "paper": Scale(
        train={"recipe": "official", "max_train_samples": 0, "max_eval_samples": 0, "max_test_samples": 0,
               "epochs": 50.0, "batch_size": 1},
        synth={"n": 2000},
        cf_grid=GRIDS["paper"]),
    "tiny": Scale(
        train={"max_train_samples": 12, "max_eval_samples": 8, "max_test_samples": 0, "epochs": 2.0,
               "batch_size": 4, "lr": 3e-2, "max_len": 400, "expert_layers": 1, "precision": "fp32", "threads": 1,
               "allow_small_groups": True},
        synth={"n": 6, "max_tokens": 16, "max_rounds": 2},
        cf_grid={"lr": [1e-2], "dim": [8], "weight_decay": [1e-6]}, cf_epochs=3),
}

# ThinkRec paper, ML-1M: Table 2 (AUC, UAUC, NDCG@5, MAP@5; bench/baselines.py has the CF rows too) and
# Table 4 (UAUC, NDCG@5, MAP@5; no AUC column, "Ours" is Table 2's row). Figures 3 and 4 show Book and Yelp
# only: the paper has no ML-1M numbers for the experts and grouping studies.
PAPER_TABLE2 = {
    "MF": (0.6401, 0.6079, 0.7286, 0.4520),
    "LightGCN": (0.6140, 0.6230, 0.7333, 0.4600),
    "SASRec": (0.6956, 0.6687, 0.7663, 0.4747),
    "TALLRec-style": (0.6872, 0.6553, 0.7683, 0.4706),
    "CoLLM-style": (0.7141, 0.6672, 0.7585, 0.4647),
    "ThinkRec": (0.7764, 0.6775, 0.7747, 0.4774),
}
PAPER_ABLATION = {
    "full": (0.7764, 0.6775, 0.7747, 0.4774),
    "w/o think": (None, 0.6599, 0.7570, 0.4623),
    "w/o experts": (None, 0.6765, 0.7740, 0.4742),
    "w/o both": (None, 0.6658, 0.7643, 0.4674),
}
PAPER = {"table2": PAPER_TABLE2, "ablation": PAPER_ABLATION}


def settings_of(studies) -> list:
    """The settings the studies need, each once, in the studies' order."""
    names = dict.fromkeys(name for study in studies for _, name in STUDIES[study])
    return [SETTINGS[n] for n in names]


def cf_models_of(studies) -> list:
    """The CF models to search: the baselines a study shows, and every setting's --cf-model."""
    kinds = {k for study in studies for k in STUDY_CF.get(study, ())}
    kinds |= {s.cf_model for s in settings_of(studies)}
    return [k for k in CF_MODELS if k in kinds]
