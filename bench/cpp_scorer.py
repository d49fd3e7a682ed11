"""Rows/s of the C++ scorer (`thinkrec-score`, AOTInductor + libtorch) against infer.py on the same rows of
the same run, plus the one-time export, compile, build and load times.

    python bench/cpp_scorer.py --run-dir runs/ml100k          # a run of train.py (default: SmolLM2-135M)
    python bench/cpp_scorer.py --run-dir RUN --max-rows 64

Steps: `python -m thinkrec.export aoti` (torch.export + AOTInductor compile; it also scores the rows with
infer.py's path, whose rows/s is the Python column), `cmake` + build against the torch wheel's libtorch,
then `thinkrec-score` on the exported rows. Both sides fp32 on the CPU with the same threads. No speed
target: the point is serving without Python at no loss of accuracy (max |C++ - Python| is printed).
Prints a table, then one JSON line.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _util import ROOT, print_json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/ml100k")
    ap.add_argument("--max-rows", type=int, default=None, help="rows of the test split (default: train.py's)")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per C++ batch")
    ap.add_argument("--work", default=None, help="where the export and the build go (default: a temp dir)")
    a = ap.parse_args()

    import numpy as np
    import torch.utils

    work = Path(a.work or tempfile.mkdtemp(prefix="thinkrec-cpp-"))
    out, build = work / "export", work / "build"
    cmd = [sys.executable, "-m", "thinkrec.export", "aoti", "--run-dir", a.run_dir, "--out", str(out)]
    if a.max_rows is not None:
        cmd += ["--max-rows", str(a.max_rows)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    export_s = time.perf_counter() - t
    info = json.loads((out / "export.json").read_text())
    t = time.perf_counter()
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                    "-DBUILD_TESTING=OFF"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True)
    build_s = time.perf_counter() - t
    cli = subprocess.run([str(build / "thinkrec-score"), str(out), "--batch-size", str(a.batch_size)],
                         check=True, capture_output=True, text=True)
    timing = json.loads(cli.stderr.strip().splitlines()[-1])
    cpp = np.array([json.loads(x)["score"] for x in cli.stdout.splitlines()])
    py = np.array([json.loads(x)["score"] for x in (out / "python" / "scores.jsonl").read_text().splitlines()])
    diff = float(np.abs(cpp - py).max())

    print("\n| scorer | rows | rows/s |")
    print("|---|---|---|")
    print(f"| infer.py (Python, padding-free, token-budget batches) | {info['rows']} | {info['python_rows_per_s']:.2f} |")
    print(f"| thinkrec-score (C++, AOTInductor, batches of {a.batch_size}) | {timing['rows']} | {timing['rows_per_s']:.2f} |")
    print(f"\none-time: export {info['export_seconds']:.0f} s, AOTInductor compile {info['compile_seconds']:.0f} s "
          f"(export step in all {export_s:.0f} s, with the Python scoring), CMake build {build_s:.0f} s, "
          f"C++ load {timing['load_seconds']:.2f} s; max |C++ - Python| = {diff:.2e}")
    print_json({"bench": "cpp_scorer", "run": a.run_dir, "rows": info["rows"], "max_len": info["max_len"],
                "python_rows_per_s": info["python_rows_per_s"], "cpp_rows_per_s": timing["rows_per_s"],
                "cpp_vs_python": round(timing["rows_per_s"] / info["python_rows_per_s"], 3),
                "export_s": info["export_seconds"], "compile_s": info["compile_seconds"], "build_s": round(build_s, 1),
                "cpp_load_s": timing["load_seconds"], "max_abs_diff": diff})


if __name__ == "__main__":
    main()
