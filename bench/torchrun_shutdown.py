"""Stress the end of a `torchrun --standalone --nproc-per-node 2` gloo run (the launch in
tests/test_train_loop.py::test_torchrun_launch_equals_one_process) and count the runs that fail.

A rank aborts with "terminate called without an active exception" if one of gloo's worker threads
(`pt_gloo_runloop`) is still releasing its last finished work while the interpreter finalizes (see
thinkrec/train/ddp.py shutdown). Under ordinary CPU load that window is rarely hit; --starve widens it:
the `pt_gloo_runloop` threads of the launched ranks get nice 19, and --busy N spins N busy processes at
nice 0, so a worker thread that has just finished a collective waits long for a CPU while its main
thread runs on. Both affect only the processes this script starts.

    python bench/torchrun_shutdown.py --runs 20 --starve --busy 2
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _children() -> dict:
    """pid -> parent pid for every process in /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        out[int(name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return out


def _descendants(root: int) -> list:
    parent = _children()
    found, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        frontier += kids
    return found


def _starve(root: int, done: set) -> None:
    """nice 19 for the gloo worker threads of `root`'s descendants (each thread once)."""
    for pid in _descendants(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            if (pid, tid) in done:
                continue
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
                if name == "pt_gloo_runloop":
                    os.setpriority(os.PRIO_PROCESS, int(tid), 19)
                    done.add((pid, tid))
            except OSError:
                continue


def one_run(root: str, starve: bool, timeout: float) -> tuple:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               os.path.join(root, "tests", "torchrun_worker.py"), os.path.join(tmp, "out.safetensors")]
        with open(os.path.join(tmp, "stderr"), "w+") as err:
            p = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=err)
            t0, seen = time.monotonic(), set()
            while p.poll() is None:
                if time.monotonic() - t0 > timeout:
                    p.kill()
                    p.wait()
                    break
                if starve:
                    _starve(p.pid, seen)
                time.sleep(0.05)
            err.seek(0)
            return p.returncode, err.read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--root", default=ROOT, help="repository whose tests/torchrun_worker.py and thinkrec/ run")
    ap.add_argument("--starve", action="store_true", help="nice 19 for the ranks' pt_gloo_runloop threads")
    ap.add_argument("--busy", type=int, default=0, help="busy-loop processes to run beside (nice 0)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--log", default=None, help="append the stderr of failed runs here")
    args = ap.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    fails = aborts = 0
    try:
        for i in range(1, args.runs + 1):
            rc, err = one_run(args.root, args.starve, args.timeout)
            abort = "terminate called" in err
            fails += rc != 0
            aborts += abort
            print(f"run {i}/{args.runs} rc={rc}{' (terminate called)' if abort else ''} "
                  f"fails={fails} aborts={aborts}", flush=True)
            if rc != 0 and args.log:
                with open(args.log, "a") as f:
                    f.write(f"===== run {i} rc={rc}\n{err[-4000:]}\n")
    finally:
        for b in busy:
            b.kill()
            b.wait()
    print(f"runs={args.runs} fails={fails} aborts={aborts} starve={args.starve} busy={args.busy} root={args.root}")


if __name__ == "__main__":
    main()
