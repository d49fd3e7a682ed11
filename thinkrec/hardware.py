"""What this machine is, for the precision policy: its CPU, whether it has native bf16, and the bf16 decision
that `--precision auto` takes on it, made once and cached.

    fp32   where the CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag): no timing at all
    bf16   where it has, when a warmed-up probe measures bf16 GEMMs at least BF16_MIN_SPEEDUP x fp32's
    fp32   where it has but this torch build does not use it (a 2-core Xeon with avx512_bf16 measured bf16 at
           ~210 GFLOP/s against fp32's ~385)

The probe runs once per machine and its decision is cached in CACHE/precision/<key>.json, keyed by CPU model,
flags, torch's thread count and torch version; THINKREC_REPROBE=1 probes again.

Why flags first and a cached decision: a short timing probe under load read fp32 2.4 and bf16 4.2 GFLOP/s
(ratio 1.75) on a CPU whose idle bf16 GEMMs run 4.4x fp32, so two runs with the same arguments trained at
different precisions. The flags say whether the hardware has bf16 at all (without it bf16 GEMMs run at
~1 GFLOP/s against ~200 for fp32); the probe only confirms that this torch build uses it, takes the best of
interleaved timings (load only ever slows a run down) and then never runs again on that machine.
"""

import functools
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkrec.errors import UserError
from thinkrec.io import cache_dir, read_json, write_json

BF16_MIN_SPEEDUP = 1.5  # auto picks bf16 on a native-bf16 CPU when its best bf16 GEMM rate is this much fp32's
# (measured 2-4.4x there; under 0.02x without native bf16: the threshold sits far from both, so load cannot flip it)
_clock = time.perf_counter  # tests make it slow or noisy


class PrecisionError(UserError, ValueError):
    """A precision this device or this job cannot run."""


# ----------------------------------------------------------------------------------------------- probes
def _best_rates(n: int, reps: int, budget_s: float) -> dict:
    """{"fp32_gflops", "bf16_gflops"} of n-cube matmuls: fp32 and bf16 timed in turns (so load slows both
    alike), two warm-up calls each, the fastest of up to `reps` calls each within budget_s."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    pairs = {"fp32_gflops": (a, b), "bf16_gflops": (a.bfloat16(), b.bfloat16())}
    best = dict.fromkeys(pairs, float("inf"))
    for x, y in pairs.values():
        x @ y, x @ y
    t_end = _clock() + budget_s
    for _ in range(reps):
        for name, (x, y) in pairs.items():
            t0 = _clock()
            x @ y
            best[name] = min(best[name], max(_clock() - t0, 1e-9))
        if _clock() > t_end:
            break
    return {name: 2 * n ** 3 / s / 1e9 for name, s in best.items()}


def confirm_probe() -> dict:
    """Measured CPU matmul rates {"fp32_gflops", "bf16_gflops", "n", "threads", "seconds"} for the
    once-per-machine decision: a 256-cube first (bf16 without a native path runs at ~1 GFLOP/s, so the
    1024-cube, 2 GFLOP a call, is timed only where bf16 keeps up); about 1-2 s in all."""
    t0 = _clock()
    rates, n = _best_rates(256, 5, 0.3), 256
    if rates["bf16_gflops"] >= 0.5 * rates["fp32_gflops"]:
        rates, n = _best_rates(1024, 10, 2.0), 1024
    rates = {k: round(v, 1) for k, v in rates.items()}
    return {**rates, "n": n, "threads": torch.get_num_threads(), "seconds": round(_clock() - t0, 3)}


def _rate(fn, flops: float, budget_s: float) -> float:
    """GFLOP/s (GOP/s) of fn(), which does `flops` operations: one untimed call, then calls until budget_s
    (at most 20)."""
    fn()
    reps, t0 = 0, _clock()
    while True:
        fn()
        reps += 1
        dt = _clock() - t0
        if dt >= budget_s or reps >= 20:
            return flops * reps / dt / 1e9


def gemm_rate(dtype, n: int, budget_s: float) -> float:
    """GFLOP/s of n x n x n matmuls in dtype on the CPU."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    return _rate(lambda: a @ b, 2 * n ** 3, budget_s)


@functools.lru_cache(maxsize=None)
def probe(threads: int = 0) -> dict:
    """Quick measured rates {"fp32_gflops", "bf16_gflops", "n", "threads", "seconds"} for the benches' tables
    (threads: part of the cache key), once per process. Never used to decide a precision: machine_bf16()
    decides."""
    t0 = _clock()
    rates = {}
    for name, dtype in (("fp32_gflops", torch.float32), ("bf16_gflops", torch.bfloat16)):
        small = gemm_rate(dtype, 256, 0.02)
        rates[name] = gemm_rate(dtype, 1024, 0.1) if small >= 20 else small
    rates.update(n=1024, threads=torch.get_num_threads(), seconds=round(_clock() - t0, 3))
    return {k: (round(v, 1) if isinstance(v, float) and k != "seconds" else v) for k, v in rates.items()}


def check_int8_available() -> None:
    engines = torch.backends.quantized.supported_engines
    if not hasattr(torch.ops.quantized, "linear_dynamic") or not ({"x86", "fbgemm"} & set(engines)):
        raise PrecisionError(f"--precision int8 needs torch's fbgemm/x86 int8 kernels "
                             f"(torch.ops.quantized.linear_dynamic); this torch {torch.__version__} has engines "
                             f"{engines}")


INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # u8 x s8 dot products accumulated in int32 directly


def int8_full_range(info: dict | None = None) -> bool:
    """Whether int8 GEMMs may use 8-bit activations: with VNNI / AMX the u8 x s8 products go straight into int32;
    without (AVX2's vpmaddubsw) pairs of them add in int16 and 8-bit activations can saturate, so 7 bits."""
    return bool(set(INT8_DOT_FLAGS) & set((info or cpu_info())["flags"]))


# --------------------------------------------------------------------------------- the decision
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags in /proc/cpuinfo that mean native bf16 GEMMs (oneDNN)
CACHE_SUBDIR = "precision"
REPROBE_ENV = "THINKREC_REPROBE"


def cpu_info() -> dict:
    """{"model", "flags"} of this CPU from /proc/cpuinfo (Linux; empty elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name":
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / Arm; the first core speaks for all
            flags = set(value.split())
    return {"model": model, "flags": sorted(flags)}


def native_bf16_flags(info: dict | None = None) -> list:
    """The flags that give this CPU native bf16 GEMMs ([] when none). Where /proc/cpuinfo is missing, torch's
    own CPU capability check for avx512_bf16 / AMX stands in."""
    info = info or cpu_info()
    found = [f for f in BF16_FLAGS if f in info["flags"]]
    if not found and not info["flags"]:
        cpu = torch.cpu
        if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
            found.append("avx512_bf16")
        if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
            found.append("amx_bf16")
    return found


def machine_key(info: dict | None = None) -> dict:
    """What the cached decision is valid for: CPU model and flags, torch's thread count and version."""
    info = info or cpu_info()
    flags = hashlib.sha256(" ".join(info["flags"]).encode()).hexdigest()[:16]
    return {"cpu": info["model"], "flags_sha256": flags, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


@dataclass(frozen=True)
class MachineBf16:
    """What this machine does with bf16: `native` flags ([] = none), the `decision` auto takes (fp32 | bf16),
    the confirming probe's rates (None where no probe was needed) and the cache file that holds them."""

    native: tuple
    decision: str
    rates: dict | None
    cache: str | None


def machine_bf16() -> MachineBf16:
    """This machine's bf16 decision (bf16_decision on this CPU and cache directory)."""
    return bf16_decision(cpu_info(), cache_dir() / CACHE_SUBDIR)


def bf16_decision(info: dict, cache: Path) -> MachineBf16:
    """fp32 without native bf16 in `info`'s flags (no timing); else the decision cached in `cache` for this
    machine_key(), or a confirming probe whose decision is cached there (THINKREC_REPROBE=1 probes again)."""
    native = tuple(native_bf16_flags(info))
    if not native:
        return MachineBf16((), "fp32", None, None)
    key = machine_key(info)
    path = Path(cache) / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".json")
    if path.is_file() and os.environ.get(REPROBE_ENV, "") in ("", "0"):
        obj = read_json(path, f"delete {path}: the next run probes this machine again")
        if isinstance(obj, dict) and obj.get("key") == key and obj.get("decision") in ("fp32", "bf16"):
            return MachineBf16(native, obj["decision"], obj.get("rates"), str(path))
    rates = confirm_probe()
    decision = "bf16" if rates["bf16_gflops"] >= BF16_MIN_SPEEDUP * rates["fp32_gflops"] else "fp32"
    write_json(path, {"key": key, "native": list(native), "decision": decision, "rates": rates,
                      "rule": f"bf16 when the best bf16 GEMM rate is at least {BF16_MIN_SPEEDUP:g}x fp32's",
                      "probed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return MachineBf16(native, decision, rates, str(path))


