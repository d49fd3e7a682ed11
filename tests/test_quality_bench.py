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


def test_paired_summary():
    """The mean paired difference, its t-interval (t_{0.975, 3} = 3.182) and fp32's own spread."""
    import pytest

    s = quality.paired_summary([0.60, 0.62, 0.64, 0.66], [0.61, 0.62, 0.66, 0.65])
    d = [0.01, 0.0, 0.02, -0.01]
    mean = sum(d) / 4
    sd = (sum((x - mean) ** 2 for x in d) / 3) ** 0.5
    assert s["n"] == 4 and s["mean_diff"] == pytest.approx(mean, abs=1e-5)
    assert s["ci95"] == pytest.approx([mean - 3.1824 * sd / 2, mean + 3.1824 * sd / 2], abs=1e-4)
    assert s["fp32_range"] == pytest.approx(0.06, abs=1e-5) and s["fp32_sd"] == pytest.approx(0.02582, abs=1e-4)
    with pytest.raises(ValueError, match="want as many"):
        quality.paired_summary([0.6], [0.6])
