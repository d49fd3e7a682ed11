"""bench/quality.py decides which precisions it trains by the CPU's flags, never by a timing taken on a loaded
machine (a probe under load once skipped bf16 on an AMX Xeon)."""
import importlib.util
import sys
from pathlib import Path

from thinkrec.hardware import MachineBf16

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.append(str(BENCH))  # the bench scripts import their _util as when run from bench/; last, shadowing nothing
_spec = importlib.util.spec_from_file_location("_bench_quality", BENCH / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def test_bf16_skipped_only_without_native_flags():
    # the cached probe said fp32 is faster: bf16 is still trained where the flags are there
    native = MachineBf16(("amx_bf16",), "fp32", {"fp32_gflops": 18.4, "bf16_gflops": 5.5}, None)
    avx2 = MachineBf16((), "fp32", None, None)
    assert quality.skip_reason("bf16", native, force_slow=False) == ""
    assert "no native bf16" in quality.skip_reason("bf16", avx2, force_slow=False)
    assert quality.skip_reason("bf16", avx2, force_slow=True) == ""
    assert quality.skip_reason("fp32", avx2, force_slow=False) == ""
