"""What the fuzz modules (tests/test_fuzz_*.py) share: Hypothesis settings that draw the same examples in every CI
run and, with THINKREC_FUZZ_EXAMPLES=N, N fresh ones per property (a long run); and the line that ends each module
with the number of examples tried."""

import os

import pytest
from hypothesis import HealthCheck, settings

LONG = "THINKREC_FUZZ_EXAMPLES" in os.environ  # a long run draws fresh examples; CI the same ones every time


def fuzz_settings(ci_examples: int):
    """Settings for a property: `ci_examples` fixed examples in CI, THINKREC_FUZZ_EXAMPLES fresh ones when set."""
    return settings(max_examples=int(os.environ.get("THINKREC_FUZZ_EXAMPLES", ci_examples)), derandomize=not LONG,
                    deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


def count_report(tried: dict, promise: str):
    """A module fixture printing "fuzz examples tried: ..." from `tried` ({boundary: count, or {outcome:
    count}}) after the module's tests, past pytest's capture."""
    @pytest.fixture(scope="module", autouse=True)
    def _report_counts(request):
        yield
        parts = []
        for name, n in tried.items():
            if isinstance(n, dict):
                outcomes = ", ".join(f"{o} {k}" for o, k in sorted(n.items()))
                parts.append(f"{name} {sum(n.values())} ({outcomes})")
            else:
                parts.append(f"{name} {n}")
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\nfuzz examples tried: {', '.join(parts)} (every example passed: {promise})", flush=True)
    return _report_counts
