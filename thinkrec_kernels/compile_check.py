"""Compile every Triton kernel for real GPUs (sm_80, sm_90) on a machine without one; check PTX and cubin.

    TRITON_INTERPRET=0 python -m thinkrec_kernels.compile_check [--cc 80 90] [--only lora_] [--jobs 2] [--ptxas PATH]

Each op module in OP_MODULES defines `compile_cases() -> list[dict]`, one dict per launch it makes: kernel (the
@triton.jit function), dtype (the torch dtype of its main operands), config (the launcher's launch_config:
constexprs plus num_warps and num_stages), args ({arg: Triton type} for pointers not in dtype and for float
scalars) and constexprs (the other constexprs). spec_from_case() turns one into what triton.compile takes:
`*_ptr` args point to dtype, other args are i32 unless args names them; the name is kernel, dtype and
blocks; matmul (tensor cores expected) is a kernel calling tl.dot on 16-bit operands. For each spec and
target this checks:
- tensor cores in matrix kernels: `mma` on sm_80; on sm_90 `wgmma` or `mma` (which one is reported: Triton
  picks wgmma only when the tiles and warps allow a warp-group MMA);
- registers and spills as ptxas allocates them (spills are decided there, not visible in PTX): `ptxas -v` on
  the kernel's PTX for the same arch (sm_90a for cc 90) with the options Triton passes, by default with the
  ptxas Triton itself runs for that target, so the numbers are those of the cubin a GPU loads. Any spill
  store or load fails; so does `.local` in the PTX. A ptxas that is missing or rejects the PTX (CUDA 13.0's
  rejects Triton 3.9's sm_90 PTX, ISA 9.4) skips these columns with the reason;
- shared memory (`compiled.metadata.shared`, what the launch asks for) within the target's per-block limit
  and within 99 KB, the smallest limit of sm_80+ GPUs (sm_86/sm_89), so that what compiles for sm_80/90
  also launches on consumer GPUs: a kernel over it compiles but fails at launch with "out of resources".
Prints a table, then one JSON line {"ok": bool, "ptxas": {cc: version}, "results": [...]}. Exit status 1
when a check fails.
"""

import argparse
import hashlib
import importlib
import inspect
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Triton 3.9 warns when this is unset; 1 keeps its current default (FMA contraction on).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

OP_MODULES = ["thinkrec_kernels.lora", "thinkrec_kernels.yes_head", "thinkrec_kernels.linear_ce"]
# Largest shared memory one block may use (bytes, opt-in maximum; CUDA programming guide, compute
# capabilities table): A100 163 KB, RTX 30xx / A10 / L4 / RTX 40xx 99 KB, H100 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
PORTABLE_SMEM = min(SMEM_LIMIT.values())
_TYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def spec_from_case(case: dict) -> dict:
    """One compile_cases() entry -> name, fn, signature, constexprs, num_warps, num_stages, matmul."""
    fn, cfg, dt = case["kernel"], case["config"], _TYPES[str(case["dtype"])]
    constexprs = {**{k: v for k, v in cfg.items() if k not in _LAUNCH_OPTIONS}, **case.get("constexprs", {})}
    args = case.get("args", {})
    signature = {a: "constexpr" if a in constexprs else args.get(a, f"*{dt}" if a.endswith("_ptr") else "i32")
                 for a in fn.arg_names}
    tiles = "_".join(f"{k[len('BLOCK_'):]}{v}" for k, v in cfg.items() if k.startswith("BLOCK_"))
    name = f"{fn.__name__.strip('_').removesuffix('_kernel')}_{dt}_{tiles}"
    return dict(name=name, fn=fn, signature=signature, constexprs=constexprs, num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"], matmul=dt != "fp32" and "tl.dot(" in inspect.getsource(fn.fn))


def collect_specs(modules, only=""):
    """The specs of every module's compile_cases(), one per distinct name, in order."""
    specs = {}
    for name in modules:
        mod = importlib.import_module(name)
        if not hasattr(mod, "compile_cases"):
            raise SystemExit(f"{name} defines no compile_cases(): every op module must list its kernels")
        for case in mod.compile_cases():
            spec = spec_from_case(case)
            if only in spec["name"]:
                specs.setdefault(spec["name"], spec)
    return list(specs.values())


def _tensor_core(ptx: str) -> str:
    """'wgmma', 'mma' or '' for the tensor-core instructions found in PTX."""
    if re.search(r"\bwgmma\.", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma"
    return ""


def parse_ptxas_v(log: str) -> dict:
    """registers, stack (frame bytes), spill_stores and spill_loads (bytes) from `ptxas -v` of one kernel."""
    patterns = dict(registers=r"Used (\d+) registers", stack=r"(\d+) bytes stack frame",
                    spill_stores=r"(\d+) bytes spill stores", spill_loads=r"(\d+) bytes spill loads")
    found = {key: re.search(pattern, log) for key, pattern in patterns.items()}
    missing = [key for key, m in found.items() if m is None]
    if missing:
        raise ValueError(f"no {', '.join(missing)} in ptxas -v output: {log[:300]!r}")
    return {key: int(m.group(1)) for key, m in found.items()}


def triton_ptxas(cc: int) -> str:
    """The ptxas Triton runs for sm_<cc> (its bundled one, or TRITON_PTXAS[_BLACKWELL]_PATH)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(cc).path


def ptxas_usage(ptx: str, cc: int, ptxas: str, fp_fusion: bool = True):
    """(parse_ptxas_v of `ptxas -v` on ptx for sm_<cc>, "") or (None, why there is none). The log is cached
    beside Triton's own cache, keyed by the ptxas binary, options and PTX, so a rerun costs no ptxas call."""
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    path = shutil.which(ptxas) if ptxas else None
    if path is None:
        return None, f"no ptxas at {ptxas!r}"
    # the options Triton's make_cubin passes, so that ptxas allocates as it did for the cubin
    options = ["-v", "--regAllocOptLevel=2", *([] if fp_fusion else ["--fmad=false"]),
               f"--gpu-name={sm_arch_from_capability(cc)}"]
    stat = os.stat(path)
    key = hashlib.sha256("\0".join([path, str(stat.st_mtime_ns), str(stat.st_size), *options, ptx]).encode())
    cached = Path(knobs.cache.dir, "ptxas_v", key.hexdigest() + ".log")
    if cached.exists():
        return parse_ptxas_v(cached.read_text()), ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        proc = subprocess.run([path, *options, str(src), "-o", str(src.with_suffix(".cubin"))],
                              capture_output=True, text=True, timeout=600)
    log = (proc.stderr + proc.stdout).replace(str(src), "kernel.ptx")
    if proc.returncode:
        return None, f"{Path(path).name} failed: {(log.strip().splitlines() or [''])[0][:160]}"
    usage = parse_ptxas_v(log)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = cached.with_suffix(f".{os.getpid()}.tmp")  # rename: parallel workers never see half a file
    tmp_file.write_text(log)
    tmp_file.replace(cached)
    return usage, ""


def compile_one(spec: dict, cc: int, ptxas: str = "triton") -> dict:
    """Compile one spec for sm_<cc> and check it; returns its result row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(name=spec["name"], cc=cc, matmul=spec["matmul"], tensor_core="", registers=None, stack=None,
               spill_stores=None, spill_loads=None, ptx_local=False, shared=0, ptxas="", ok=False, error="",
               seconds=0.0)
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"])
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        ptx = compiled.asm["ptx"]
        row["tensor_core"] = _tensor_core(ptx)
        row["ptx_local"] = bool(re.search(r"\.local\b|ld\.local|st\.local", ptx))
        row["shared"] = int(compiled.metadata.shared)
        usage, row["ptxas"] = ptxas_usage(ptx, cc, triton_ptxas(cc) if ptxas == "triton" else ptxas,
                                          bool(getattr(compiled.metadata, "enable_fp_fusion", True)))
        row.update(usage or {})
        limit = min(SMEM_LIMIT.get(cc, 48 * 1024), PORTABLE_SMEM)  # 48 KB: what any block gets without opt-in
        errors = []
        if usage is not None and (usage["spill_stores"] or usage["spill_loads"]):
            errors.append(f"ptxas spills {usage['spill_stores']} B stores / {usage['spill_loads']} B loads")
        if row["ptx_local"]:
            errors.append("local memory in PTX")
        if row["matmul"] and not row["tensor_core"]:
            errors.append("no tensor-core instruction in PTX")
        if row["shared"] > limit:
            errors.append(f"shared memory {row['shared']} B > limit {limit} B")
        row["ok"] = not errors
        row["error"] = "; ".join(errors)
    except Exception as exc:  # a compile failure is a result to report, not a crash of the whole check
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _compile_indexed(job):
    """Worker: (modules, only, spec index, cc, ptxas) -> result row; specs hold functions, so workers
    re-collect them (cheap: the modules are already imported in the forked process)."""
    modules, only, index, cc, ptxas = job
    return compile_one(collect_specs(modules, only)[index], cc, ptxas)


def run_all(modules, ccs, only="", jobs=1, ptxas="triton"):
    """Compile every selected spec for every cc, in `jobs` forked worker processes (compiling is CPU-bound,
    ~1-4 s a kernel); rows come back in spec order."""
    todo = [(modules, only, i, cc, ptxas) for i in range(len(collect_specs(modules, only))) for cc in ccs]
    if jobs <= 1 or len(todo) <= 1:
        return [_compile_indexed(job) for job in todo]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_indexed, todo))


def _ptxas_versions(ccs, ptxas):
    """{cc: "path (release X.Y)" or why not} for the header."""
    out = {}
    for cc in ccs:
        path = triton_ptxas(cc) if ptxas == "triton" else ptxas
        if not shutil.which(path):
            out[cc] = f"MISSING: no ptxas at {path!r}; register and spill columns skipped"
            continue
        text = subprocess.run([shutil.which(path), "--version"], capture_output=True, text=True, timeout=60).stdout
        release = re.search(r"release ([\d.]+)", text)
        out[cc] = f"{shutil.which(path)} (release {release.group(1) if release else '?'})"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 90], help="compute capabilities to target")
    ap.add_argument("--only", default="", help="only specs whose name contains this substring")
    ap.add_argument("--modules", nargs="+", default=OP_MODULES, help="op modules to import")
    ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compile processes")
    ap.add_argument("--ptxas", default="triton",
                    help="ptxas for the register/spill report: 'triton' (the one Triton compiles the cubin "
                         "with, per target) or a path, e.g. the CUDA toolkit's")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("thinkrec_kernels/compile_check.py: TRITON_INTERPRET=1 makes @triton.jit interpret; run with "
                 "TRITON_INTERPRET=0 to get compilable kernels")
    versions = _ptxas_versions(args.cc, args.ptxas)
    for cc, version in versions.items():
        print(f"sm_{cc} ptxas: {version}")
    rows = run_all(args.modules, args.cc, args.only, args.jobs, args.ptxas)
    print(f"{'kernel':34s} {'sm':>3s} {'tensor core':>11s} {'regs':>4s} {'spill st/ld B':>13s} {'smem B':>7s} "
          f"{'ok':>3s} {'s':>6s}  error")
    for r in rows:
        regs = "-" if r["registers"] is None else str(r["registers"])
        spills = "-" if r["spill_stores"] is None else f"{r['spill_stores']}/{r['spill_loads']}"
        print(f"{r['name']:34s} {r['cc']:3d} {r['tensor_core'] or '-':>11s} {regs:>4s} {spills:>13s} "
              f"{r['shared']:7d} {'yes' if r['ok'] else 'NO':>3s} {r['seconds']:6.2f}  {r['error']}")
    for note in sorted({f"sm_{r['cc']}: {r['ptxas']}" for r in rows if r["ptxas"]}):
        print(f"register/spill columns skipped, {note}")
    ok = bool(rows) and all(r["ok"] for r in rows)
    print(json.dumps({"ok": ok, "ptxas": versions, "results": rows}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
