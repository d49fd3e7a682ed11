"""Every Triton kernel compiles for sm_80 and sm_90 at the launcher's block sizes, uses tensor cores and does
not spill (kernels/compile_check.py, run in a subprocess because the test session imports the kernels under
the interpreter, and @triton.jit decides interpret-or-compile at import time)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.compile_check import OP_MODULES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", OP_MODULES)
def test_kernels_compile_with_tensor_cores_and_no_spills(module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--modules", module],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"compile_check printed no JSON line; rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    rows = json.loads(lines[-1])["results"]
    assert rows, f"{module}: compile_specs() gave no kernels"
    assert {r["cc"] for r in rows} == {80, 90}
    bad = [f"{r['name']} sm_{r['cc']}: {r['error']}" for r in rows if not r["ok"]]
    assert not bad, f"{module}: kernels failing the compile check:\n" + "\n".join(bad)
    for r in rows:
        if r["matmul"]:
            allowed = {"mma"} if r["cc"] == 80 else {"mma", "wgmma"}
            assert r["tensor_core"] in allowed, f"{r['name']} sm_{r['cc']}: tensor core {r['tensor_core']!r}"
