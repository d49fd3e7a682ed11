"""Every Triton kernel compiles for sm_80 and sm_90 at the launcher's block sizes, uses tensor cores, does
not spill (ptxas -v on its PTX) and fits in shared memory (thinkrec_kernels/compile_check.py, run in a subprocess
because the test session imports the kernels under the interpreter, and @triton.jit decides
interpret-or-compile at import time).

Also the GPU-only launch facts a CPU can check: the launchers' grids and blocks at large shapes (meta
tensors, kernels replaced by recorders) against CUDA's grid limits, and THINKREC_KERNELS=triton in a fresh
process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thinkrec_kernels import linear_ce, lora, yes_head
from thinkrec_kernels.compile_check import OP_MODULES, parse_ptxas_v, ptxas_usage

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", OP_MODULES)
def test_kernels_compile_with_tensor_cores_and_no_spills(module):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "thinkrec_kernels.compile_check", "--modules", module],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"compile_check printed no JSON line; rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    report = json.loads(lines[-1])
    rows = report["results"]
    assert rows, f"{module}: compile_cases() gave no kernels"
    assert {r["cc"] for r in rows} == {80, 90}
    assert set(report["ptxas"]) == {"80", "90"} and not any("MISSING" in v for v in report["ptxas"].values())
    bad = [f"{r['name']} sm_{r['cc']}: {r['error']}" for r in rows if not r["ok"]]
    assert not bad, f"{module}: kernels failing the compile check:\n" + "\n".join(bad)
    for r in rows:
        where = f"{r['name']} sm_{r['cc']}"
        if r["matmul"]:
            allowed = {"mma"} if r["cc"] == 80 else {"mma", "wgmma"}
            assert r["tensor_core"] in allowed, f"{where}: tensor core {r['tensor_core']!r}"
        # ptxas ran for every spec (no skipped column) and allocated without spilling
        assert not r["ptxas"] and r["registers"] is not None, f"{where}: no ptxas report ({r['ptxas']})"
        assert 0 < r["registers"] <= 255, f"{where}: {r['registers']} registers"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{where}: spills {r}"
        assert 0 < r["shared"] <= 99 * 1024, f"{where}: {r['shared']} B shared memory"


def test_ptxas_v_parser_reads_the_report():
    """The lines `ptxas -v` prints for one kernel (here ptxas-blackwell 13.4's for a spilling fp32 expand)."""
    log = ("ptxas-blackwell info    : 0 bytes gmem\n"
           "ptxas-blackwell info    : Compiling entry function '_lora_expand_kernel' for 'sm_90a'\n"
           "ptxas-blackwell info    : Function properties for _lora_expand_kernel\n"
           "    32 bytes stack frame, 40 bytes spill stores, 28 bytes spill loads\n"
           "ptxas-blackwell info    : Used 255 registers, used 1 barriers, 32 bytes cumulative stack size\n")
    assert parse_ptxas_v(log) == dict(registers=255, stack=32, spill_stores=40, spill_loads=28)
    with pytest.raises(ValueError, match="registers"):
        parse_ptxas_v("ptxas info    : 0 bytes gmem\n")


def test_missing_ptxas_skips_the_report_with_a_reason():
    usage, why = ptxas_usage(".version 8.0\n.target sm_80\n", 80, str(ROOT / "no" / "ptxas"))
    assert usage is None and "no ptxas at" in why


def test_every_op_module_lists_its_kernels():
    """compile_cases() names each kernel of its module, and the configs are the launchers' own."""
    jitted = {m: {n for n, v in vars(m).items() if n.endswith("_kernel") and hasattr(v, "arg_names")}
              for m in (lora, yes_head, linear_ce)}
    for m, names in jitted.items():
        listed = {c["kernel"].__name__ for c in m.compile_cases()}
        assert listed == names, f"{m.__name__}: compile_cases lists {sorted(listed)}, kernels {sorted(names)}"
    assert {m.rsplit(".", 1)[1] for m in OP_MODULES} == {"lora", "yes_head", "linear_ce"}


# ------------------------------------------------------------------ launch configurations at large shapes
# CUDA grid limits: x up to 2**31 - 1, y and z up to 65,535 (a launch over them fails only on a GPU).
GRID_MAX = (2**31 - 1, 65535, 65535)


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kw)` records the launch, runs nothing."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((self.name, tuple(grid), args, kw))


def _check_launches(launches):
    assert launches
    for name, grid, args, kw in launches:
        assert len(grid) <= 3 and all(1 <= g <= lim for g, lim in zip(grid, GRID_MAX)), f"{name}: grid {grid}"
        for key, v in kw.items():
            if key.startswith("BLOCK"):
                assert v >= 16, f"{name}: {key}={v} (tl.dot and GPU layouts need >= 16)"
        for a in (*args, *kw.values()):  # offsets are int64 only along rows; int32 must cover the rest
            if isinstance(a, torch.Tensor) and a.dim() == 3:  # A/B (addressed by e, i, column) and dA/dB parts
                assert a.numel() < 2**31, f"{name}: {tuple(a.shape)} tensor needs int64 offsets"


@pytest.mark.parametrize("op", ["lora_mix", "lora_linear"])
def test_lora_launchers_fit_cuda_limits_at_large_shapes(op, monkeypatch):
    """Forward and backward at M=100k, K=N=16384, E=16, r=64 on meta tensors (nothing allocated), with the
    kernels replaced by recorders: every grid fits CUDA's limits, every block is >= 16."""
    launches = []
    for k in ("_lora_shrink_kernel", "_lora_expand_kernel", "_lora_grad_weight_kernel"):
        monkeypatch.setattr(lora, k, _Recorder(k, launches))
    monkeypatch.setattr(lora, "use_triton", lambda *tensors: True)  # meta tensors: take the Triton path anyway
    M, K, N, E, r = 100_000, 16384, 16384, 16, 64
    kw = dict(device="meta", dtype=torch.bfloat16, requires_grad=True)
    x, A, B, w = (torch.empty(M, K, **kw), torch.empty(E, r, K, **kw), torch.empty(E, N, r, **kw),
                  torch.empty(M, E, **kw))
    if op == "lora_mix":
        out = lora.lora_mix(x, A, B, w, 2.0)
    else:
        out = lora.lora_linear(x, torch.empty(N, K, **kw), None, A, B, w, 2.0)
    out.backward(torch.empty_like(out))
    names = [name for name, *_ in launches]
    assert names.count("_lora_shrink_kernel") == 2 and names.count("_lora_expand_kernel") == 2
    assert names.count("_lora_grad_weight_kernel") == 2
    _check_launches(launches)


def test_head_launchers_fit_cuda_limits_at_large_shapes(monkeypatch):
    """The row kernels at large M / T and Llama-3's vocabulary: 1-D grids, blocks >= 16."""
    launches = []
    monkeypatch.setattr(yes_head, "_yes_head_bce_fwd_kernel", _Recorder("yes_head", launches))
    monkeypatch.setattr(linear_ce, "_ce_rows_kernel", _Recorder("ce_rows", launches))
    M, D, V = 1_000_000, 4096, 128256
    h = torch.empty(M, D, device="meta", dtype=torch.bfloat16)
    yes_head._TritonOps.forward(h, torch.empty(D, device="meta", dtype=torch.bfloat16),
                                torch.empty(M, device="meta"), 1.0)
    C = linear_ce._chunk_rows(M, V, 2, linear_ce.CHUNK_BYTES)
    linear_ce._TritonOps.ce_rows(torch.empty(C, V, device="meta", dtype=torch.bfloat16),
                                 torch.empty(C, device="meta", dtype=torch.int64), torch.empty(C, device="meta"),
                                 -100, torch.empty(C, device="meta"))
    assert [name for name, *_ in launches] == ["yes_head", "ce_rows"]
    _check_launches(launches)


def test_triton_mode_works_in_a_fresh_process():
    """THINKREC_KERNELS=triton set before `import thinkrec_kernels`, no TRITON_INTERPRET and no CUDA: the package turns
    the interpreter on itself, and all four ops run their Triton kernels (interpreted) and match the
    references."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only switch to the interpreter")
    code = """
import torch
import thinkrec_kernels
from thinkrec_kernels import reference as ref
assert type(thinkrec_kernels.lora._lora_shrink_kernel).__name__ == "InterpretedFunction"
assert thinkrec_kernels.use_triton(torch.zeros(1))
g = torch.Generator().manual_seed(0)
x, A, B = torch.randn(5, 20, generator=g), torch.randn(3, 4, 20, generator=g), torch.randn(3, 12, 4, generator=g)
w, W = torch.rand(5, 3, generator=g), torch.randn(12, 20, generator=g)
err = [(thinkrec_kernels.lora_mix(x, A, B, w, 0.5) - ref.lora_mix(x, A, B, w, 0.5)).abs().max(),
       (thinkrec_kernels.lora_linear(x, W, None, A, B, w, 0.5) - ref.lora_linear(x, W, None, A, B, w, 0.5)).abs().max()]
y, t = torch.tensor([1.0, 0, 1, 0, 1]), torch.tensor([1, 2, -100, 3, 11])
err.append((thinkrec_kernels.yes_head_bce(x, W, 3, y)[0] - ref.yes_head_bce(x, W, 3, y)[0]).abs())
err.append((thinkrec_kernels.linear_cross_entropy(x, W, t) - ref.linear_cross_entropy(x, W, t)).abs())
print("ERR", max(float(e) for e in err))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(THINKREC_KERNELS="triton", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = float(proc.stdout.split("ERR")[-1])
    assert err < 1e-4, f"THINKREC_KERNELS=triton in a fresh process: max |diff| {err}"
    # triton imported first: too late to switch the interpreter on (its tl helpers are compile-only by then);
    # a warning at import and use_triton's error naming TRITON_INTERPRET, not a failure inside the kernel
    late = ("import torch, triton\nimport thinkrec_kernels\n"
            "thinkrec_kernels.lora_mix(torch.ones(2, 4), torch.ones(1, 2, 4), torch.ones(1, 3, 2), torch.ones(2, 1), 1.0)")
    proc = subprocess.run([sys.executable, "-c", late], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "TRITON_INTERPRET=1" in proc.stderr.splitlines()[-1], proc.stderr[-3000:]
    assert "imported before thinkrec_kernels" in proc.stderr
