"""Compile every Triton kernel for real GPUs (sm_80, sm_90) on a machine without one, and check the PTX.

    TRITON_INTERPRET=0 python -m kernels.compile_check [--cc 80 90] [--only lora_] [--jobs 2]

Each op module in OP_MODULES defines `compile_specs() -> list[dict]` with keys name, fn (the @triton.jit
kernel), signature ({arg: "*bf16" | "i32" | "fp32" | "constexpr"}), constexprs, num_warps, num_stages,
matmul (True when the kernel should use tensor cores) and optionally max_shared (bytes). For each spec and
target this checks:
- matrix kernels contain tensor-core instructions: `mma` on sm_80; on sm_90 `wgmma` or `mma` (which one is
  reported: Triton picks wgmma only when the tiles and warps allow a warp-group MMA);
- no local-memory spills: no `.local` declarations or `ld.local` / `st.local` in the PTX;
- shared memory (`compiled.metadata.shared`) within the target's per-block limit (SMEM_LIMIT): a kernel over
  it compiles but fails at launch with "out of resources", so this is the only place a CPU machine sees it.
Prints a table, then one JSON line {"ok": bool, "results": [...]}. Exit status 1 when a check fails.
"""

import argparse
import importlib
import json
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

# Triton 3.9 warns when this is unset; 1 keeps its current default (FMA contraction on).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

OP_MODULES = ["kernels.lora_mix", "kernels.yes_head_bce", "kernels.linear_cross_entropy"]
# Largest shared memory one block may use (bytes, opt-in maximum; CUDA programming guide, compute
# capabilities table): A100 163 KB, RTX 30xx / A10 / L4 / RTX 40xx 99 KB, H100 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _tensor_core(ptx: str) -> str:
    """'wgmma', 'mma' or '' for the tensor-core instructions found in PTX."""
    if re.search(r"\bwgmma\.", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma"
    return ""


def _spills(ptx: str) -> bool:
    return bool(re.search(r"\.local\b|ld\.local|st\.local", ptx))


def compile_one(spec: dict, cc: int) -> dict:
    """Compile one spec for sm_<cc>; returns a result row (ok, tensor_core, spills, error, seconds)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(name=spec["name"], cc=cc, matmul=bool(spec.get("matmul")), tensor_core="", spills=False,
               shared=0, ok=False, error="", seconds=0.0)
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec.get("constexprs", {}))
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        ptx = compiled.asm["ptx"]
        row["tensor_core"] = _tensor_core(ptx)
        row["spills"] = _spills(ptx)
        row["shared"] = int(compiled.metadata.shared)
        # 48 KB: what any block gets without opting in; a spec's max_shared can ask for less (lora_mix asks
        # for sm_86/89's 99 KB so that what compiles for sm_80 also launches on consumer GPUs)
        limit = min(SMEM_LIMIT.get(cc, 48 * 1024), spec.get("max_shared", 1 << 30))
        errors = (["local-memory spill"] if row["spills"] else []) + \
            ([] if row["tensor_core"] or not row["matmul"] else ["no tensor-core instruction in PTX"]) + \
            ([f"shared memory {row['shared']} B > sm_{cc} limit {limit} B"] if row["shared"] > limit else [])
        row["ok"] = not errors
        row["error"] = "; ".join(errors)
    except Exception as exc:  # a compile failure is a result to report, not a crash of the whole check
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _compile_indexed(job):
    """Worker: (module name, spec index, cc) -> result row; specs hold functions, so workers re-collect."""
    module, index, cc = job
    return compile_one(importlib.import_module(module).compile_specs()[index], cc)


def run_all(modules, ccs, only="", jobs=1):
    """Compile every selected spec for every cc, in `jobs` forked worker processes (compiling is CPU-bound,
    ~1-4 s a kernel); rows come back in spec order."""
    todo = []
    for name in modules:
        for i, spec in enumerate(collect_specs([name])):
            if only in spec["name"]:
                todo += [(name, i, cc) for cc in ccs]
    if jobs <= 1 or len(todo) <= 1:
        return [_compile_indexed(job) for job in todo]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_indexed, todo))


def collect_specs(modules, only=""):
    specs = []
    for name in modules:
        mod = importlib.import_module(name)
        if not hasattr(mod, "compile_specs"):
            raise SystemExit(f"{name} defines no compile_specs(): every op module must list its kernels")
        specs += [s for s in mod.compile_specs() if only in s["name"]]
    return specs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 90], help="compute capabilities to target")
    ap.add_argument("--only", default="", help="only specs whose name contains this substring")
    ap.add_argument("--modules", nargs="+", default=OP_MODULES, help="op modules to import")
    ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compile processes")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("kernels/compile_check.py: TRITON_INTERPRET=1 makes @triton.jit interpret; run with "
                 "TRITON_INTERPRET=0 to get compilable kernels")
    rows = run_all(args.modules, args.cc, args.only, args.jobs)
    print(f"{'kernel':34s} {'sm':>3s} {'tensor core':>11s} {'spills':>6s} {'smem B':>7s} {'ok':>3s} {'s':>6s}  error")
    for r in rows:
        print(f"{r['name']:34s} {r['cc']:3d} {r['tensor_core'] or '-':>11s} {str(r['spills']):>6s} "
              f"{r['shared']:7d} {'yes' if r['ok'] else 'NO':>3s} {r['seconds']:6.2f}  {r['error']}")
    ok = bool(rows) and all(r["ok"] for r in rows)
    print(json.dumps({"ok": ok, "results": rows}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
