import os

import torch

# Without a GPU, Triton kernels run under the interpreter; @triton.jit reads this when kernel modules are
# imported, so it is set before any test module imports thinkrec_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

# What thinkrec.hardware.machine_bf16 says during the tests: a CPU without native bf16, so `--precision auto`
# (train.py's default) resolves to fp32 on every machine, results do not depend on the CPU the suite runs on,
# and no test writes a decision into the user's cache. Tests of the policy itself call
# hardware.bf16_decision with their own CPU info and cache directory (tests/test_precision.py).
SLOW_BF16_PROBE = {"fp32_gflops": 200.0, "bf16_gflops": 1.0, "n": 1024, "threads": 1, "seconds": 0.0}


@pytest.fixture(scope="session", autouse=True)
def _fixed_precision_decision():
    """Session-wide, so module-scoped fixtures that run train.py see it too."""
    from thinkrec import hardware

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hardware, "machine_bf16", lambda: hardware.MachineBf16((), "fp32", None, None))
        mp.setattr(hardware, "probe", lambda threads=0: dict(SLOW_BF16_PROBE))
        yield
