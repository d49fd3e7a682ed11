"""Kill `python train.py` with SIGKILL at chosen points, continue it with --resume, and compare every
artifact with an uninterrupted run of the same arguments (thinkrec.io.run_fingerprint: tensors and arrays
bit for bit, JSON without wall-clock fields).

    python bench/kill_resume.py                          # the default run (ml100k, SmolLM2-135M): ~40 min
    python bench/kill_resume.py --only random --kills 3  # one row
    python bench/kill_resume.py --train-args "--max-train-samples 32"   # extra train.py flags for every run

Kill points: stage 1 before its first checkpoint, stage 1 right after a mid-stage checkpoint (with
--ckpt-minutes 0.05, so one exists; checkpoint timing does not change results), stage 2 before its first
checkpoint, right after the CF model is written (the experts phase), and N random kills in a row, each
followed by --resume. Prints a table, then one JSON line.
"""

import argparse
import json
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from _util import ROOT, print_json

from thinkrec.io import run_fingerprint


def launch(run: Path, extra: list, log):
    cmd = [sys.executable, str(ROOT / "train.py"), "--run-dir", str(run), "--no-progress", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def run_to_end(run: Path, extra: list, log) -> None:
    if launch(run, extra, log).wait() != 0:
        raise SystemExit(f"train.py failed; see {log.name}")


def kill_when(proc, condition, timeout: float = 3600) -> bool:
    """SIGKILL proc as soon as condition() holds; False if the run ended first."""
    start = time.time()
    while proc.poll() is None and time.time() - start < timeout:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    return False


def after(seconds: float, first):
    """A condition that holds from `seconds` after first() first held."""
    since = []

    def condition():
        if not since and first():
            since.append(time.time())
        return bool(since) and time.time() - since[0] >= seconds
    return condition


def log_has(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/kill-resume", help="where the runs go (each row its own directory)")
    ap.add_argument("--train-args", default="", help="extra train.py flags for every run (one string)")
    ap.add_argument("--kills", type=int, default=8, help="kills in a row for the random row")
    ap.add_argument("--only", default="", help="run only the rows whose name contains this")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(a.train_args)

    ref = out / "reference"
    with open(out / "reference.log", "w") as log:
        if not (ref / "metrics.json").exists():
            t = time.time()
            run_to_end(ref, extra, log)
            print(f"reference run: {time.time() - t:.0f} s", flush=True)
    want = run_fingerprint(ref)
    want_auc = json.loads((ref / "metrics.json").read_text())["test"]["auc"]

    rows = {  # kill point -> (extra flags for its runs, (run dir, log) -> condition to kill at)
        "stage 1 before its first checkpoint": ([], lambda run, lp: after(3, lambda: log_has(lp, "train rows"))),
        "stage 1 after a mid-stage checkpoint": (["--ckpt-minutes", "0.05"], lambda run, lp: lambda: (
            (run / "stage1" / "ckpt" / "ckpt.json").exists() and not (run / "stage1" / "adapters.json").exists())),
        "stage 2 before its first checkpoint": ([], lambda run, lp: after(2, lambda: (
            (run / "stage1" / "adapters.json").exists()))),
        "experts phase (after the CF model)": ([], lambda run, lp: lambda: (run / "cf" / "mf.safetensors").exists()),
    }
    results = []
    for name, (flags, make_condition) in rows.items():
        if a.only not in name:
            continue
        slug = name.split(" (")[0].replace(" ", "-")
        run, log_path = out / slug, out / f"{slug}.log"
        with open(log_path, "w") as log:
            landed = kill_when(launch(run, extra + flags, log), make_condition(run, log_path))
            present = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
            run_to_end(run, extra + flags + ["--resume"], log)
        results.append(_row(name, int(landed), run, want, want_auc, present))

    if a.only in "random":  # --only matches a substring of the row's name, "" matches every row
        rng = random.Random(a.seed)
        run, log_path = out / "random", out / "random.log"
        kills = 0
        with open(log_path, "w") as log:
            for k in range(a.kills):
                proc = launch(run, extra + (["--resume"] if k else []), log)
                delay = rng.uniform(5, 60)
                start = time.time()
                if kill_when(proc, lambda: time.time() - start > delay):
                    kills += 1
                else:
                    break
            if not (run / "metrics.json").exists():
                run_to_end(run, extra + ["--resume"], log)
        results.append(_row(f"{a.kills} random kills in a row", kills, run, want, want_auc, []))

    print("| kill point | kills | artifacts | identical to uninterrupted | test AUC resumed / uninterrupted |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['kill_point']} | {r['kills']} | {r['artifacts']} | "
              f"{'yes' if r['identical'] else 'NO: ' + ', '.join(r['differ'])} | {r['auc']:.4f} / {want_auc:.4f} |")
    print_json({"bench": "kill_resume", "train_args": extra, "reference_auc": want_auc, "results": results,
                "all_identical": all(r["identical"] for r in results)})


def _row(name, kills, run, want, want_auc, present):
    got = run_fingerprint(run)
    differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    return {"kill_point": name, "kills": kills, "artifacts": len(got), "identical": not differ, "differ": differ,
            "auc": json.loads((run / "metrics.json").read_text())["test"]["auc"], "files_at_kill": len(present)}


if __name__ == "__main__":
    main()
