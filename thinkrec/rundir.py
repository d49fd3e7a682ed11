"""The layout of a train.py run directory, in one place: every phase, tool and CLI that reads or writes a run
asks RunDir for the path instead of joining it by hand.

    RUN/data/                 prepared data (stats.json marks it done); data/keywords.jsonl: item keywords
    RUN/cf/<model>.*          the CF model's export (the .safetensors marks it done)
    RUN/experts/              groups.safetensors (gate weights, centroids), report.json
    RUN/reasoning/            traces.jsonl (+ .failures.jsonl)
    RUN/stage1|2|3/           adapters.json (marks the stage done), adapters.safetensors, train.json, ckpt/
    RUN/infer/                scores.jsonl, metrics.json of the last scoring
    RUN/metrics.json          the run's summary (args, stages, test metrics)
    RUN/precision.json, RUN/recipe.json   what the run trains at, and with
"""

from pathlib import Path

STAGES = ("stage1", "stage2", "stage3")  # the order they train in


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
