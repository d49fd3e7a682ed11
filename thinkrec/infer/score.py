"""`scores.jsonl` written as batches finish, resumable (the batches come from thinkrec.scoring).

`ScoreLog` appends each finished batch's lines to `<out>.partial.jsonl`, and a rerun skips the rows already
there (a batch cut in the middle by a kill is scored again and only its missing rows are appended). The
finished file is written in input order, in one atomic rename, so a complete `scores.jsonl` is never
half-written.
"""

import json
import os
from pathlib import Path

from thinkrec.io import AppendLog, ArtifactError, atomic_file, read_json, to_json, write_json


class ScoreLog:
    """`scores.jsonl` written as batches finish (into `scores.partial.jsonl`), resumable.

    `meta` (the arguments that decide what is scored) is stored beside the partial file; a rerun with other
    arguments is refused rather than mixing two jobs' rows. `finish(lines)` writes the final file in input
    order atomically and removes the partial one.
    """

    def __init__(self, path, meta: dict):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.stem + ".partial.jsonl")
        self.meta_path = self.path.with_name(self.path.stem + ".partial.json")
        self.meta = json.loads(to_json(meta))

    def start(self, overwrite: bool = False) -> dict:
        """{position: line dict} of rows already scored by an interrupted run with the same meta."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for p in (self.partial, self.meta_path):
                p.unlink(missing_ok=True)
        done = {}
        if self.meta_path.exists() and self.partial.exists():
            old = read_json(self.meta_path, f"delete {self.partial} to score from the start")
            if old != self.meta:
                diff = sorted(k for k in set(old) | set(self.meta) if old.get(k) != self.meta.get(k))
                raise ArtifactError(f"{self.partial} holds rows of a run with other arguments ({', '.join(diff)} "
                                    f"differ); rerun with the same arguments to continue it, or pass --overwrite")
            done = self._read_complete_lines()
        else:
            self.partial.unlink(missing_ok=True)
            write_json(self.meta_path, self.meta)
        return done

    def _read_complete_lines(self) -> dict:
        """Lines up to the last newline (a kill can cut the last one; it is dropped from the file too)."""
        done = {}
        for n, obj in enumerate(AppendLog(self.partial, "delete it or pass --overwrite").read(), 1):
            try:
                done[int(obj["pos"])] = obj
            except (KeyError, TypeError, ValueError, OverflowError) as e:
                raise ArtifactError(f"{self.partial}: record {n} is not a score line ({e}); delete the file or pass "
                                    "--overwrite") from None
        return done

    def append(self, lines: list) -> None:
        """One write of a batch's lines, flushed to disk before the next batch starts."""
        with open(self.partial, "a", encoding="utf-8") as f:
            f.write("".join(to_json(x) + "\n" for x in lines))
            f.flush()
            os.fsync(f.fileno())

    def finish(self, lines: list) -> None:
        with atomic_file(self.path) as f:
            for x in lines:
                f.write((to_json(x) + "\n").encode("utf-8"))
        self.partial.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)
