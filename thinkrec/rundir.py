"""The layout of a train.py run directory, in one place: every phase, tool and CLI that reads or writes a run
asks RunDir for the path instead of joining it by hand.

    RUN/data/                 prepared data (stats.json marks it done); data/keywords.jsonl: item keywords
    RUN/cf/<model>.*          the CF model's export (the .safetensors marks it done)
    RUN/experts/              groups.safetensors (gate weights, centroids), report.json
    RUN/reasoning/            traces.jsonl (+ .failures.jsonl)
    RUN/stage1|2|3/           adapters.json (marks the stage done), adapters.safetensors, train.json, ckpt/
    RUN/infer/                scores.jsonl, metrics.json of the last scoring
    RUN/config.json           the run's arguments, typed (train.py writes it when it starts; infer.py, export,
                              the experiments read it back with `RunDir.config`)
    RUN/metrics.json          the run's summary (args, stages, test metrics)
    RUN/precision.json, RUN/recipe.json   what the run trains at, and with
"""

from pathlib import Path

from thinkrec.io import ArtifactError, read_json, write_json

from thinkrec.stages import STAGES  # noqa: F401  (the stage names, in order: thinkrec/stages.py)
# train.py arguments that say how a run was driven, not what it computes: never recorded
NOT_RECORDED = ("resume", "ckpt_minutes", "no_progress")


def config_of(args: dict) -> dict:
    """The record of a run's arguments {dest: value}: JSON values as they are (numbers stay numbers, None is
    null), paths as strings, the driving flags (NOT_RECORDED) left out."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in args.items() if k not in NOT_RECORDED}


def _legacy_value(text):
    """A value from the `str(v)` records of runs made before config.json: "None" -> None, "True" -> True,
    "0.001" -> 0.001, "8" -> 8, anything else stays a string."""
    if not isinstance(text, str):
        return text
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def keywords(self) -> Path:
        """The default item keywords file (python -m thinkrec.reasoning keywords writes it)."""
        return self.data / "keywords.jsonl"

    def cf(self, model: str, suffix: str = ".safetensors") -> Path:
        return self.path / "cf" / f"{model}{suffix}"

    @property
    def experts(self) -> Path:
        return self.path / "experts"

    @property
    def traces(self) -> Path:
        """The default reasoning traces file (python -m thinkrec.reasoning synth writes it)."""
        return self.path / "reasoning" / "traces.jsonl"

    def stage(self, name: str) -> Path:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; one of {STAGES}")
        return self.path / name

    @property
    def infer(self) -> Path:
        return self.path / "infer"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def write_config(self, args: dict) -> dict:
        """Record the run's arguments (`config_of`) in RUN/config.json, atomically; returns the record."""
        record = config_of(args)
        write_json(self.config_path, record)
        return record

    def config(self) -> dict:
        """The arguments the run was trained with, typed: RUN/config.json, or for a run made before it the
        strings of RUN/metrics.json's "args" read back as values; {} when neither exists (nothing trained).
        A damaged one (not JSON, not an object of arguments) is an ArtifactError naming it: no run is scored or
        resumed with defaults in place of its arguments."""
        redo = "run train.py --resume with the run's arguments to write it again"
        if self.config_path.is_file():
            cfg = read_json(self.config_path, redo)
            if not isinstance(cfg, dict):
                raise ArtifactError(f"{self.config_path} is damaged (not a JSON object of arguments); {redo}")
            return cfg
        if self.metrics.is_file():
            m = read_json(self.metrics, redo)
            old = m.get("args", {}) if isinstance(m, dict) else None
            if not isinstance(old, dict):
                raise ArtifactError(f"{self.metrics} is damaged (no \"args\" object of arguments); {redo}")
            return {k: _legacy_value(v) for k, v in old.items()}
        return {}
