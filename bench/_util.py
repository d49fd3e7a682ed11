"""What the bench scripts share: the repository on sys.path, the shared ML-1M split, timing, peak memory,
one measurement per subprocess, the closing JSON line. `python bench/<script>.py` has bench/ on sys.path,
so a script's `from _util import ...` (before any thinkrec / thinkrec_kernels import) resolves, and puts the
repository root on sys.path: the scripts run from a checkout without installing. torch is imported lazily.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ML1M = ROOT.parent / "shared" / "data" / "ml1m-collm"  # the paper's ML-1M split: interactions.csv, items.csv


def ml1m_prepared():
    """The shared ML-1M split through the data layer's `csv` source, prepared once into the temp dir and
    reused by later runs and other scripts."""
    from thinkrec.data import load_prepared, prepare

    run = Path(tempfile.gettempdir()) / "thinkrec-bench-ml1m"
    if not (run / "data" / "stats.json").exists():
        prepare("csv", data_dir=ML1M, out=run, noun="movie", quiet=True)
    return load_prepared(run)


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def sync(device) -> None:
    """Wait for the device: CUDA calls return before the kernels finish."""
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize()


def time_runs(fn, repeats: int, device="cpu", warmup: int = 0, budget_s: float | None = None,
              min_repeats: int = 2) -> list:
    """Seconds of each timed call of fn(), the device synchronised after every call. `warmup` untimed calls
    first; then `repeats` calls, or with `budget_s`: at least `min_repeats`, and more up to `repeats` while
    under `budget_s` seconds in all. Report statistics.median of the list."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < repeats and (budget_s is None or len(times) < min_repeats
                                    or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


class Stopwatch:
    """Wall and CPU (this process) seconds since it was made; the CPU time means something on a loaded box too."""

    def __init__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    def cpu(self) -> float:
        return time.process_time() - self.cpu0


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_memory(device="cpu") -> int:
    """Reset the peak-memory mark and return the bytes in use now, the baseline for `peak_memory`.

    CUDA: torch's allocator statistics. CPU: the process RSS; writing 5 to /proc/self/clear_refs resets the
    peak VmHWM (Linux >= 4.0). ru_maxrss cannot serve: Linux carries it across fork+exec, so a worker would
    start with its parent's peak (a bench parent that just checked results holds hundreds of MB).
    """
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def peak_memory(device="cpu") -> int:
    """Peak bytes since `reset_peak_memory` (allocated by torch on CUDA, RSS on CPU); subtract its baseline."""
    if _is_cuda(device):
        import torch

        return torch.cuda.max_memory_allocated()
    return _status_kb("VmHWM") * 1024


def print_json(obj) -> None:
    """The one machine-readable line a script (or a worker, to its parent) prints last."""
    print(json.dumps(obj), flush=True)


def run_worker(script, args: list, env: dict | None = None) -> dict:
    """Run `python script *args` in a fresh process and return the last JSON line of its stdout: one
    measurement per process, so no allocator state or peak mark carries over from another."""
    cmd = [sys.executable, str(script), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"worker {' '.join(cmd[1:])} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])
