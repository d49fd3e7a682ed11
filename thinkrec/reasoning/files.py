"""What `synth` and `keywords` share: the data they read and the failures log beside their output."""

from pathlib import Path

from thinkrec.data.prompts import NOUNS
from thinkrec.errors import UsageError


def failures_path(out) -> Path:
    """The failures log beside an output log: traces.jsonl -> traces.failures.jsonl."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".failures.jsonl")


def load_data(dataset, data_dir, run, noun=None):
    """(prepared data, noun): RUN's prepared data (prepared there first when missing, as train.py does), or
    the dataset prepared in memory when there is no RUN. noun: the prompts' noun (default the data's)."""
    from thinkrec.data import load_prepared, prepare

    if run and (Path(run) / "data" / "stats.json").exists():
        prep = load_prepared(run)
    elif dataset is None:
        raise UsageError(f"--run-dir {run} has no prepared data (no data/stats.json) and no --dataset was given"
                         if run else "give --dataset (and --data-dir), or --run with prepared data")
    else:
        prep = prepare(dataset, data_dir=data_dir, out=run, quiet=True, noun=noun)
    return prep, noun or prep.stats.get("noun") or NOUNS.get(prep.stats.get("dataset"), "item")
