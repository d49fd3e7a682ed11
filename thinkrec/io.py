"""Run-directory files: atomic writes, strict JSON, readers that name a damaged file, one tool per run.

Writes go to a temporary file beside the target (`.<name>.<random>.tmp`), are fsynced, given the mode an
ordinary `open` would give (0o666 & ~umask; mkstemp's 0o600 would hide artifacts from the group), then
renamed over the target, and the directory is fsynced so the renames reach the disk in program order
(a phase's completion marker, written last, never survives a crash its companions did not).

Readers (`read_json`, `read_jsonl`, `read_safetensors`, `load_npz`) take `recompute`, the hint for the
user ("delete RUN/cf/mf.safetensors to retrain the CF model"), and turn a truncated or corrupt file into
one `ArtifactError` line naming the file, what is wrong and that hint, instead of a traceback from json,
numpy or safetensors.

`RunLock(run_dir, what)` keeps a second train.py / infer.py / reasoning synthesis out of a run directory
in use; `clean_stale_temps(run_dir)`, called while holding it, removes what killed writes left behind.
"""

import fcntl
import json
import math
import os
import shlex
import socket
import struct
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

from thinkrec.errors import UserError

TMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"
_LEGACY_TEMPS = {".interactions.tmp.npz"}  # save_prepared's fixed temporary name before atomic_file


class ArtifactError(UserError, ValueError):
    """A run artifact is missing its content or cannot be parsed; the message says what to delete."""


class RunLockedError(UserError, RuntimeError):
    """Another live process holds the run directory."""


# --- atomic writes

def cache_dir() -> Path:
    """Where thinkrec keeps what it computes once per machine (the converted model, downloads, the precision
    decision): $THINKREC_CACHE, else ~/.cache/thinkrec."""
    return Path(os.environ.get("THINKREC_CACHE") or Path.home() / ".cache" / "thinkrec")


def _read_umask() -> int:
    """The process umask without changing it (Linux >= 4.7 reports it in /proc); otherwise set and restore
    it once, here at import, before any thread of ours creates files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


FILE_MODE = 0o666 & ~_read_umask()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some FUSE and network file systems refuse fsync on a directory; ordering is then theirs
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path):
    """Yield a binary file to write `path` through: on a clean exit it is fsynced, given FILE_MODE and
    renamed over `path`; on an exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# --- strict JSON

def finite(obj):
    """`obj` with every NaN and +-inf float (in dicts, lists, tuples) replaced by None.

    JSON has no such numbers: Python writes `NaN` / `Infinity`, which jq, JavaScript, Go and most other
    readers reject. null stands for "no finite value": e.g. Cohen's d between groups with zero spread
    (experts.cohens_d gives +-inf), or an AUC over a single label (NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def to_json(obj, indent: int | None = None) -> str:
    """Standard JSON text of `obj` (non-finite floats as null, see `finite`), non-ASCII kept."""
    return json.dumps(finite(obj), indent=indent, allow_nan=False, ensure_ascii=False)


def write_json(path, obj, indent: int | None = 1) -> None:
    """Atomically write `obj` as standard JSON (see `to_json`), newline-terminated."""
    atomic_write_text(path, to_json(obj, indent) + "\n")


def write_jsonl(path, rows) -> None:
    """Atomically write one standard-JSON object per line."""
    atomic_write_text(path, "".join(to_json(r) + "\n" for r in rows))


class AppendLog:
    """An append-only JSON Lines file for long jobs that may be killed and rerun (scores, traces, keywords).

    `read()` returns the complete records and cuts a last line a kill left without its newline (from the file
    too, so the next append starts on a clean line); a complete line that is not JSON is an ArtifactError
    naming file and line. `append(obj)` writes one line and flushes it, under a lock, so worker threads can
    share one log. Each line is written with one write() call, and a record counts only once its newline is
    on disk, so a rerun never sees half a record."""

    def __init__(self, path, recompute: str = "delete it to start over"):
        self.path, self.recompute = Path(path), recompute
        self._lock = threading.Lock()

    def read(self) -> list:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        cut = data.rfind(b"\n") + 1
        if cut < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(cut)
        rows = []
        # split on b"\n" only, as append writes them: str.splitlines would also cut at U+2028, U+0085, ... that
        # to_json keeps raw inside strings (ensure_ascii=False)
        for n, line in enumerate(data[:cut].split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise _damaged(self.path, f"line {n} is not valid JSON", e, self.recompute) from None
        return rows

    def ints(self, key: str, kind: str | None = None) -> set:
        """{record[key]} of the complete records (of those whose "kind" is `kind`, when given): the integers a
        resumed job skips; a record without an integer `key` is an ArtifactError naming the file."""
        out = set()
        for n, r in enumerate(self.read(), 1):
            if not isinstance(r, dict):
                raise _damaged(self.path, f"record {n} is not an object", repr(r)[:60], self.recompute)
            if kind is not None and r.get("kind") != kind:
                continue
            v = r.get(key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise _damaged(self.path, f"record {n} has no integer {key!r}", repr(v)[:60], self.recompute)
            out.add(v)
        return out

    def append(self, obj) -> None:
        line = (to_json(obj) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()


# --- readers that name the damaged file

def _damaged(path, what: str, err: BaseException | str, recompute: str) -> ArtifactError:
    reason = " ".join(str(err).split()) or type(err).__name__  # one line
    if len(reason) > 160:
        reason = reason[:157] + "..."
    return ArtifactError(f"{path} is damaged ({what}: {reason}); {recompute}")


def _check_exists(path: Path, recompute: str) -> None:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; {recompute}")


def read_json(path, recompute: str):
    """The JSON value in `path`; ArtifactError (naming the file and `recompute`) if missing or unparsable."""
    path = Path(path)
    _check_exists(path, recompute)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise _damaged(path, "not valid JSON", e, recompute) from None


def read_jsonl(path, recompute: str) -> list:
    """The JSON values of `path`, one per non-empty line; a bad line is reported with its number."""
    path = Path(path)
    _check_exists(path, recompute)
    rows = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except ValueError as e:
                raise _damaged(path, f"line {n} is not valid JSON", e, recompute) from None
    return rows


def read_safetensors(path, recompute: str) -> dict:
    """{name: torch tensor} of a safetensors file (safetensors.torch.load_file), or ArtifactError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    _check_exists(path, recompute)
    try:
        return load_file(path)
    except SafetensorError as e:
        raise _damaged(path, "unreadable safetensors", e, recompute) from None


def safetensors_metadata(path, recompute: str) -> dict:
    """The string metadata ({"tag": ...}) a safetensors file was saved with, or ArtifactError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_exists(path, recompute)
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        raise _damaged(path, "unreadable safetensors", e, recompute) from None


def load_npz(path, recompute: str) -> dict:
    """{name: numpy array} of an .npz written with np.savez (every array read, pickles refused; zip CRCs
    checked), or ArtifactError."""
    import numpy as np

    path = Path(path)
    _check_exists(path, recompute)
    with open(path, "rb") as f:  # opened here: an OSError below is the file's content (a seek a header sends
        try:                      # before the start), not a permission
            with np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, struct.error, OSError,
                NotImplementedError, RuntimeError) as e:  # a flipped compression method / encryption flag in a header
            raise _damaged(path, "unreadable npz", e, recompute) from None


def require_keys(path, found, wanted, recompute: str) -> None:
    """ArtifactError if any of `wanted` is not among `found` (the names a file holds)."""
    missing = [k for k in wanted if k not in found]
    if missing:
        raise ArtifactError(f"{path} lacks {missing} (it holds {sorted(found)[:8]}); {recompute}")


# --- one process per run directory

def _holder_info(what: str) -> dict:
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    argv[0] = os.path.basename(argv[0])  # "python", not the venv path
    return {"pid": os.getpid(), "host": socket.gethostname(), "what": what, "command": shlex.join(argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe_holder(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode("utf-8"))
    except ValueError:
        return "another process (its details are not in the lock file yet)"
    command = " ".join(str(h.get("command", "?")).split())
    if len(command) > 300:
        command = command[:297] + "..."
    host = f" on {h.get('host')}" if h.get("host") not in (None, socket.gethostname()) else ""
    return f"PID {h.get('pid', '?')}{host} ({command}), started {h.get('started', '?')}"


class RunLock:
    """Exclusive use of a run directory for one process, taken at the top of a tool and held to its end:

        with RunLock(run_dir, "train.py"):
            removed = clean_stale_temps(run_dir)
            ...

    An flock on RUN/.lock: the kernel drops it when the holder exits or is killed, so a lock of a dead
    process is taken over without any stale-file check. The holder's PID, host, command line and start
    time are written into the file, for the message a second process gets (RunLockedError, at once, no
    waiting). Forked children (DataLoader workers) share the lock; a process that takes it twice fails.
    The file is never deleted: unlinking a locked file lets two processes lock different inodes.
    Under torchrun only the main rank takes it."""

    def __init__(self, run_dir, what: str):
        self.run_dir = Path(run_dir)
        self.what = what
        self.path = self.run_dir / LOCK_NAME
        self._fd = None

    def __enter__(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = b""
            for _ in range(20):  # the holder writes its details just after locking
                raw = os.pread(fd, 4096, 0)
                if raw:
                    break
                time.sleep(0.01)
            os.close(fd)
            raise RunLockedError(f"{self.run_dir} is in use by {_describe_holder(raw)}; "
                                 f"wait for it or stop it") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_info(self.what)) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a free lock describes no one
            os.close(self._fd)  # releases the flock
            self._fd = None


def clean_stale_temps(run_dir) -> list:
    """Remove, under `run_dir` (recursively, symlinks not followed), the temporary files a killed atomic
    write leaves: `.<name>.<random>.tmp` (atomic_file) and `.interactions.tmp.npz` (older save_prepared).
    Only safe while holding RunLock (a live writer's temporary file looks the same). Returns the paths
    removed, for the caller to log."""
    removed = []
    for root, _, files in os.walk(run_dir):
        for name in files:
            if name.startswith(".") and (name.endswith(TMP_SUFFIX) or name in _LEGACY_TEMPS):
                path = Path(root) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return sorted(removed)


# ------------------------------------------------------------------------------------------ comparing runs
def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items()
                if k not in ("seconds", "probe") and not k.endswith("_per_s")}  # probe: measured GEMM rates
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def run_fingerprint(run_dir) -> dict:
    """{relative path: sha256 hex} of a run's artifacts, to tell whether two runs produced the same ones:
    JSON without its wall-clock fields ("seconds", "*_per_s", the precision "probe"'s measured rates) and with the run directory's own path replaced by RUN,
    .npz by its arrays (the zip entries carry write times), safetensors by metadata and tensor bytes, every
    other file byte for byte. Mid-stage checkpoints (each save has a random tag) and the lock are left out."""
    import hashlib

    import numpy as np
    from safetensors import safe_open

    run = Path(run_dir)
    out = {}
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run).as_posix()
        if not path.is_file() or "ckpt" in rel.split("/")[:-1] or path.name == LOCK_NAME:
            continue
        h = hashlib.sha256()
        if path.suffix == ".json":
            obj = _without_timing(json.loads(path.read_text(encoding="utf-8").replace(str(run), "RUN")))
            h.update(json.dumps(obj, sort_keys=True).encode())
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                for k in sorted(z.files):
                    h.update(k.encode() + z[k].dtype.str.encode() + str(z[k].shape).encode() + z[k].tobytes())
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "np") as f:
                h.update(json.dumps(f.metadata(), sort_keys=True).encode())
                for k in sorted(f.keys()):
                    t = f.get_tensor(k)
                    h.update(k.encode() + t.dtype.str.encode() + str(t.shape).encode() + t.tobytes())
        else:
            h.update(path.read_bytes())
        out[rel] = h.hexdigest()
    return out
