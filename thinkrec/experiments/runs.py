"""The runs behind the studies: shared phases computed once, one `train.py` subprocess per setting.

    RUNS/<scale>/shared/     data/ (prepared once); cf/<kind>.* (one grid-searched CF model per kind, by
                             thinkrec.cf.search as bench/baselines.py does: Table 2's baseline rows and the
                             embeddings every LLM run reads); reasoning/traces.jsonl (synthesised once by
                             `python -m thinkrec.reasoning synth`, or copied from --traces)
    RUNS/<scale>/<setting>/  a train.py run directory. Before train.py starts, the runner links in data/,
                             cf/<kind>.*, reasoning/traces.jsonl (settings with traces) and each finished
                             stage 1 / 2 of another setting with the same inputs; train.py skips what exists.

Reuse rules: a copied stage must be the one train.py would have trained here.
    stage 1  prompts without ids (+ traces): the same traces and CF embedding size (the projector, still at
             its initialisation, is stored with the adapters, so its shape must match)
    stage 2  adds the CF ids: the same traces and --cf-model
    stage 3  and the groups depend on --experts and --cf-model: never copied
    Every other train.py flag must be equal (the donor's RUN/experiment.json). A stage copied into a run
    with another --experts gets that many expert slots, each a copy of the global adapter
    (`resize_adapters`): before stage 3 only the global adapter is used, and stage 3 starts every expert
    from it. So the experts study varies N in stage 3 alone; a fresh run with another N would differ only
    by the random initialisation draws of stages 1 and 2 (the LoRA A of N + 1 adapters share one stream).

Resuming: a setting whose metrics.json exists is read, not recomputed; its recorded args (and the request
in RUN/experiment.json, written before the first launch) must match, else the runner stops and names
the directory. Otherwise train.py --resume continues it. Subprocess output goes to a log beside the
artifacts (RUN/train.log, shared/reasoning/synth.log); a failure shows its last lines.
"""

import filecmp
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import thinkrec
from thinkrec.cf.train import GRIDS, CFConfig, predict, save, search, split_metrics
from thinkrec.data import load_prepared, prepare
from thinkrec.errors import UserError
from thinkrec.infer.rows import official_sample
from thinkrec.io import atomic_write_bytes, read_json, write_json
from thinkrec.metrics import evaluate
from thinkrec.model.adapters import CONFIG, resize_adapters
from thinkrec.precision import resolve as resolve_precision
from thinkrec.precision import stored as stored_precision
from thinkrec.rundir import config_of
from thinkrec.stages import STAGES
from thinkrec.stages import get as get_stage

from .plan import SCALES, SETTINGS, Scale, Setting

ROOT = Path(thinkrec.__file__).resolve().parents[1]
TRAIN = ROOT / "train.py"
PER_SETTING = ("traces", "cf_model", "experts", "last_stage")  # train.py flags that differ between settings


class ExperimentError(UserError, RuntimeError):
    """A run that cannot go on: a mismatch with what a directory holds, a failed subprocess."""


@dataclass
class Config:
    runs: Path  # RUNS/<scale>: shared/ and one directory per setting
    scale: str  # a key of plan.SCALES
    dataset: str = "csv"
    data: str | None = None  # raw files (train.py --data-dir), absolute
    noun: str | None = None  # what prompts call an item (train.py --noun; None: the dataset's default)
    model: str | None = None  # train.py --model (None: its default)
    teacher: str = "local"  # synth --teacher
    teacher_model: str | None = None  # synth --teacher-model (the served model of an HTTP teacher)
    traces: Path | None = None  # a traces file to use instead of synthesis
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # train.py flags over the scale's

    @property
    def shared(self) -> Path:
        return self.runs / "shared"

    @property
    def budget(self) -> Scale:
        return SCALES[self.scale]


class Log:
    """Plain progress lines with the time since the runner started."""

    def __init__(self, sink=None):
        self.sink, self.t0 = sink or (lambda line: print(line, flush=True)), time.monotonic()

    def __call__(self, msg: str) -> None:
        self.sink(f"[experiments {clock(time.monotonic() - self.t0)}] {msg}")


def num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------------------------- shared phases
def shared_data(cfg: Config, log):
    """The prepared data, as train.py would prepare it (once, in shared/data/)."""
    if not (cfg.shared / "data" / "stats.json").is_file():
        log(f"preparing the {cfg.dataset} data into {cfg.shared / 'data'}")
        prepare(cfg.dataset, data_dir=cfg.data, out=cfg.shared, quiet=True, noun=cfg.noun)
    return load_prepared(cfg.shared)


def cf_model(cfg: Config, prep, kind: str, log) -> dict:
    """Grid-search CF model `kind` on valid AUC (thinkrec.cf.search, the model's own grid unless the scale
    names one), export it to shared/cf/ and return its info: selection, test metrics on the full test split
    and on the official 25% sample (None where the data has none). Searched before: read back."""
    done = cfg.shared / "cf" / f"{kind}.safetensors"
    redo = f"delete {done.parent}/{kind}.* to search again"
    if done.is_file():
        log(f"CF {kind}: searched before, reused ({done.parent / f'{kind}.json'})")
        return read_json(done.parent / f"{kind}.json", redo)
    grid = cfg.budget.cf_grid or GRIDS[kind]
    log(f"CF {kind}: grid search starts ({len(grid['lr']) * len(grid['dim']) * len(grid['weight_decay'])} "
        f"configurations)")
    threads = torch.get_num_threads()
    torch.set_num_threads(CFConfig.threads)  # tiny models: one thread avoids spin-waits on a busy box
    t = time.monotonic()
    try:
        model, best, _, data = search(kind, prep, grid, seed=cfg.seed, max_epochs=cfg.budget.cf_epochs,
                                      progress=sys.stderr.isatty())  # bars on a terminal, none in a log
    finally:
        torch.set_num_threads(threads)
    sample = official_sample(prep, cfg.data, "test")
    official = None if sample is None or not len(sample) else evaluate(
        data.user[sample].numpy(), predict(model, data, sample), data.label[sample].numpy())
    info = {"grid": grid, "selected": best, "valid": split_metrics(model, data, "valid"),
            "test": split_metrics(model, data, "test"), "test_official_sample": official,
            "seconds": round(time.monotonic() - t, 1)}
    save(cfg.shared, kind, model, prep, info)
    log(f"CF {kind}: done in {clock(time.monotonic() - t)}; test AUC {num(info['test']['auc'])} "
        f"UAUC {num(info['test']['uauc'])}")
    return read_json(done.parent / f"{kind}.json", redo)


def shared_traces(cfg: Config, log) -> Path:
    """shared/reasoning/traces.jsonl: --traces copied, or synthesised once (synth.json marks it done)."""
    out = cfg.shared / "reasoning" / "traces.jsonl"
    done = out.parent / "synth.json"
    if cfg.traces is not None:
        request = {"from": str(cfg.traces)}
    else:
        request = {"dataset": cfg.dataset, "data_dir": cfg.data, "teacher": cfg.teacher, "model": cfg.teacher_model,
                   "select": "random", "seed": cfg.seed, **cfg.budget.synth}
    if done.is_file():
        check_same(out.parent, read_json(done, f"delete {out.parent}/ to make the traces again")["request"],
                   request)
        log(f"traces: made before, reused ({out})")
        return out
    if cfg.traces is not None:
        if out.exists() and not filecmp.cmp(out, cfg.traces, shallow=False):
            raise ExperimentError(f"{out} holds other traces than --traces {cfg.traces}; delete {out.parent}/ "
                                  f"or give another --runs directory")
        atomic_write_bytes(out, Path(cfg.traces).read_bytes())
        log(f"traces: {cfg.traces} copied to {out}")
    else:
        log(f"traces: starting python -m thinkrec.reasoning synth (teacher {cfg.teacher}, "
            f"{cfg.budget.synth.get('n')} samples)")
        t = time.monotonic()
        # the request keeps the key "model" (synth.json of runs made before); the flag is --teacher-model
        named = {("teacher_model" if k == "model" else k): v for k, v in request.items()}
        launch([sys.executable, "-m", "thinkrec.reasoning", "synth", *flags(named), "--run-dir", str(cfg.shared),
                "--out", str(out), "--no-progress"],
               out.parent / "synth.log", "trace synthesis")
        log(f"traces: done in {clock(time.monotonic() - t)} ({out.parent / 'synth.log'})")
    n = sum(1 for line in out.open(encoding="utf-8") if line.strip()) if out.exists() else 0
    if n == 0:
        raise ExperimentError(f"no reasoning traces in {out} (see {out.parent / 'synth.log'}): the think rows "
                              f"would train without reasoning. Try a stronger --teacher or pass --traces FILE")
    write_json(done, {"request": config_of(request), "traces": n})
    return out


# ------------------------------------------------------------------------------------------------- settings
def train_args(cfg: Config, s: Setting) -> dict:
    """train.py flags of setting `s`, by argparse dest (None: not passed)."""
    run = cfg.runs / s.name
    return {"dataset": cfg.dataset, "data_dir": cfg.data, "noun": cfg.noun, "model": cfg.model, "run_dir": run,
            "traces": run / "reasoning" / "traces.jsonl" if s.traces else None, "cf_model": s.cf_model,
            "experts": s.experts, "last_stage": s.last_stage, "seed": cfg.seed, **cfg.budget.train, **cfg.overrides}


def run_setting(cfg: Config, s: Setting, log) -> dict:
    """metrics.json of setting `s`: read when the run finished before, else train.py launched to make it."""
    run = cfg.runs / s.name
    args = train_args(cfg, s)
    wanted = {k: v for k, v in args.items() if k != "run_dir"}  # the directory may have moved
    metrics, redo = run / "metrics.json", f"delete {run / 'metrics.json'} to test the run again"
    if metrics.is_file():
        m = read_json(metrics, redo)
        check_same(run, m.get("args", {}), wanted)
        log(f"{s.name}: finished before, reused ({metrics})")
        return m
    request = run / "experiment.json"
    if request.is_file():
        check_same(run, read_json(request, f"delete {request}")["args"], wanted)
    else:
        write_json(request, {"setting": asdict(s), "args": config_of(wanted)})
    check_precision(cfg, args)
    reused = link_inputs(cfg, s)
    log(f"{s.name}: starting train.py --last-stage {s.last_stage} ({'with' if s.traces else 'without'} traces, "
        f"{s.cf_model}, {s.experts} experts" + "".join(f"; {st} reused from {d}" for st, d in reused) + ")")
    t = time.monotonic()
    launch([sys.executable, str(train_script()), *flags(args), "--resume", "--no-progress"], run / "train.log",
           f"train.py for {s.name}")
    m = read_json(metrics, redo)
    log(f"{s.name}: done in {clock(time.monotonic() - t)}; test AUC {num(m['test']['auc'])} "
        f"UAUC {num(m['test']['uauc'])} on {m['test_rows']} rows ({run / 'train.log'})")
    return m


def check_precision(cfg: Config, args: dict) -> None:
    """A new train.py run trains at the precision of every run already under RUNS, so one study's rows never
    mix precisions by accident (the same --precision auto is fp32 on one CPU and bf16 on another)."""
    requested = args.get("precision") or "auto"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = resolve_precision(requested, device, training=True).name
    for run in sorted(d for d in cfg.runs.iterdir() if d.is_dir()):
        st = stored_precision(run)
        if st is not None and st["name"] != name:
            raise ExperimentError(
                f"{run} trained at {st['name']}, but --precision {requested} is {name} on this machine: the study's "
                f"rows would mix precisions (which moves AUC by ~0.03 at this scale). Pass --precision "
                f"{st['name']} to go on at that precision, or --runs DIR for a new set of runs")


def link_inputs(cfg: Config, s: Setting) -> list:
    """Link the shared data, CF model and traces into the setting's run, and copy the finished stages 1/2
    of another setting with the same inputs; returns [(stage, donor name)]."""
    run = cfg.runs / s.name
    if not (run / "data").exists():
        copy_tree(cfg.shared / "data", run / "data")
    for name in (f"{s.cf_model}.json", f"{s.cf_model}.safetensors"):  # the tensors last: they mark it done
        link_file(cfg.shared / "cf" / name, run / "cf" / name)
    if s.traces:
        link_file(cfg.shared / "reasoning" / "traces.jsonl", run / "reasoning" / "traces.jsonl")
    reused = []
    for stage in STAGES[:STAGES.index(s.last_stage) + 1]:
        if get_stage(stage).routed:  # experts are trained on one setting's groups: never shared
            continue
        donor = None if (run / stage).exists() else find_donor(cfg, s, stage)
        if donor is not None:
            copy_tree(donor / stage, run / stage, n_experts=s.experts)
            reused.append((stage, donor.name))
    return reused


def find_donor(cfg: Config, s: Setting, stage: str) -> Path | None:
    """A run directory of another setting whose finished `stage` had the same inputs as `s`'s would."""
    mine = train_args(cfg, s)
    for other in SETTINGS.values():
        d = cfg.runs / other.name
        if other.name == s.name or other.traces != s.traces or not (d / stage / CONFIG).is_file():
            continue
        if get_stage(stage).cf_tokens and other.cf_model != s.cf_model:  # its tokens come from the CF model
            continue
        if not get_stage(stage).cf_tokens and cf_dim(cfg, other.cf_model) != cf_dim(cfg, s.cf_model):
            continue  # its saved (untrained) projector has the CF model's input size
        recorded = read_json(d / "experiment.json", f"delete {d}/")["args"] if (d / "experiment.json").is_file() else {}
        if all(same(recorded.get(k), v) for k, v in mine.items() if k not in ("run_dir", *PER_SETTING)):
            return d
    return None


def cf_dim(cfg: Config, kind: str) -> int | None:
    path = cfg.shared / "cf" / f"{kind}.json"
    return read_json(path, f"delete {cfg.shared}/cf/{kind}.*")["shapes"]["user_emb"][1] if path.is_file() else None


# ------------------------------------------------------------------------------------------------ files
def copy_tree(src: Path, dst: Path, n_experts: int | None = None) -> None:
    """Hard-link (else copy) `src` to `dst` without mid-stage checkpoints, through a temporary directory
    renamed at the end, so a kill never leaves a half-copied stage that looks finished. An adapter
    directory is given `n_experts` expert slots when it has another number."""
    tmp = dst.parent / f".{dst.name}.copying"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("ckpt"), copy_function=_link)
    if n_experts is not None and read_json(tmp / CONFIG, f"delete {src}/")["n_experts"] != n_experts:
        resize_adapters(tmp, n_experts)
    os.replace(tmp, dst)


def link_file(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        _link(src, dst)


def _link(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


# ------------------------------------------------------------------------------------------- subprocesses
def train_script() -> Path:
    if not TRAIN.is_file():
        raise ExperimentError(f"{TRAIN} not found: the experiments launch train.py, which comes with a source "
                              f"checkout of thinkrec (clone the repository and pip install -e . there), not with "
                              f"an installed package")
    return TRAIN


def flags(args: dict) -> list:
    """Command-line flags of {dest: value}: None and False left out, True as a bare flag."""
    out = []
    for k, v in args.items():
        if v is None or v is False:
            continue
        out += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return out


def launch(argv: list, log_path: Path, what: str) -> None:
    """Run `argv` from the repository root, its output appended to `log_path`; a failure raises with the
    log's last lines. Ctrl-C ends the child too (subprocess.run kills it)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(f"\n$ {shlex.join(argv)}\n")
        f.flush()
        rc = subprocess.run(argv, check=False, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).returncode
    if rc != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise ExperimentError(f"{what} failed (exit status {rc}); the end of {log_path}:\n" + "\n".join(tail))


# ------------------------------------------------------------------------------------------- comparisons
def same(recorded, wanted) -> bool:
    """A recorded value equals the wanted one (numbers compared as numbers: 1.0 == 1; records made before
    RUN/config.json hold strings: '1.0' == 1, 'None' == None)."""
    if str(recorded) == str(wanted):
        return True
    try:
        return float(recorded) == float(wanted)
    except (TypeError, ValueError):
        return False


def check_same(where: Path, recorded: dict, wanted: dict) -> None:
    diff = [f"{k} {recorded.get(k)} (asked: {v})" for k, v in wanted.items() if not same(recorded.get(k), v)]
    if diff:
        raise ExperimentError(f"{where} was made with other settings: {'; '.join(diff)}. Delete {where}/ to "
                              f"recompute it, or give another --runs directory")
