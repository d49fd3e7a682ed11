"""What a stage reads: sets of samples (rows + prompt builder [+ traces]) and the reasoning traces file.

Trace file (JSON Lines, written by the reasoning-data step; append-only, so a later line for the same
row replaces an earlier one):  {"split": "train", "row": <row index>, "label": 0|1, "reason": "<text>"}
Rows are indices into the prepared interactions (thinkrec/data/prepared.py).
"""

import json
from pathlib import Path

import numpy as np

from thinkrec.data.errors import malformed
from thinkrec.data.prepared import SPLITS


class SampleSet:
    """Rows of a prepared dataset rendered by one PromptBuilder; with `traces` the answers are the traces."""

    def __init__(self, builder, rows, traces: dict = None):
        self.builder = builder
        self.rows = np.asarray(rows, dtype=np.int64)
        self.traces = traces
        self._lengths = None

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, i: int):
        r = int(self.rows[i])
        return self.builder.sample(r, None if self.traces is None else self.traces[r])

    @property
    def lengths(self) -> np.ndarray:
        """[n] tokens per sample (prompt + answer), for the length-bucketed sampler."""
        if self._lengths is None:
            self.builder.warm(self.rows)
            self._lengths = np.array([len(self.sample(i)) for i in range(len(self.rows))], dtype=np.int64)
        return self._lengths

    @property
    def users(self) -> np.ndarray:
        return self.builder.prep.inter.user[self.rows]

    @property
    def prefix_groups(self) -> np.ndarray:
        """[n] int: one id per (user, history) among the rows, i.e. per prompt prefix up to the target (rows of
        one user rated in the same second), for the sampler that keeps such rows in one batch."""
        key = np.column_stack([self.users, self.builder.hist[self.rows]])
        return np.unique(key, axis=0, return_inverse=True)[1].reshape(-1)

    @property
    def labels(self) -> np.ndarray:
        return self.builder.prep.inter.label[self.rows]


def read_traces(path, prep, split: str = "train") -> dict:
    """{row: reason text} of `split` from a trace file; rows whose label disagrees with the data are errors.
    A bad line (not UTF-8, not JSON, not a trace, not a row of the data) is a DataError naming file and line."""
    path = Path(path)
    redo = ("fix or delete that line, or delete the file and synthesize the traces again "
            "(python -m thinkrec.reasoning synth)")
    out = {}
    with open(path, "rb") as f:  # JSON Lines: one record per b"\n"-ended line, UTF-8
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
                row, label, reason = int(obj["row"]), int(obj["label"]), str(obj["reason"])
                sp = obj.get("split", "train")
            except (KeyError, TypeError, ValueError, OverflowError) as e:  # ValueError: JSON, UTF-8, int("x")
                raise malformed(path, line_no, f"expected {{\"split\", \"row\", \"label\", \"reason\"}} "
                                               f"({' '.join(str(e).split())[:160]}); {redo}") from None
            if sp != split:
                continue
            if not 0 <= row < len(prep.inter) or prep.inter.split[row] != SPLITS.index(split):
                raise malformed(path, line_no, f"row {row} is not a {split} row of the prepared data; {redo}")
            if prep.inter.label[row] != label:
                raise malformed(path, line_no, f"row {row} has label {label} but the data says "
                                 f"{int(prep.inter.label[row])}; {redo}")
            out[row] = reason
    return out
