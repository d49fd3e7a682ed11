import os

import torch

# Without a GPU, Triton kernels run under the interpreter; @triton.jit reads this when kernel modules are
# imported, so it is set before any test module imports thinkrec_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

# What thinkrec.precision.probe reports during the tests: a CPU without fast bf16, so `--precision auto`
# (train.py's default) resolves to fp32 on every machine and results do not depend on the CPU the suite
# runs on. Tests of the policy itself patch other rates in (tests/test_precision.py).
SLOW_BF16_PROBE = {"fp32_gflops": 200.0, "bf16_gflops": 1.0, "n": 1024, "threads": 1, "seconds": 0.0}


@pytest.fixture(scope="session", autouse=True)
def _fixed_precision_probe():
    """Session-wide, so module-scoped fixtures that run train.py see it too."""
    from thinkrec import precision

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(precision, "probe", lambda int8=False, threads=0: dict(SLOW_BF16_PROBE))
        yield
