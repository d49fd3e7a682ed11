"""The C++ CPU kernels (thinkrec_kernels/cpu/*.cpp), built into one extension by torch.utils.cpp_extension at
first use (a C++ compiler on PATH; ninja, a dependency; ~30 s once, then cached under torch's extensions
directory): the bf16 attention backward on brgemm (cpu_attention.py) and Philox dropout (dropout.py).

`load()` returns the module, or False where it cannot be built here: one warning says so, and each caller runs
its plain-torch path instead.
"""

import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

_DIR = Path(__file__).with_name("cpu")
_SOURCES = ("module.cpp", "attention.cpp", "dropout.cpp")
_lock = threading.Lock()
_ext = None  # the built module, False when it cannot be built here, None before trying


def _say_if_building() -> None:
    """One line on stderr before a first build (~30 s of silence otherwise); nothing when it is cached."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        where = Path(_get_build_directory("thinkrec_cpu", False))
        if any(where.glob("thinkrec_cpu*.so")):
            return
    except Exception:  # a private helper of torch's: if it moved, say nothing
        return
    print(f"thinkrec_kernels: compiling the C++ CPU kernels (once per machine, ~30 s; cached in {where})",
          file=sys.stderr, flush=True)


def load():
    global _ext
    if _ext is not None:  # decided: every layer of every step asks, no lock needed
        return _ext
    with _lock:
        if _ext is None:
            try:
                from torch.utils.cpp_extension import load as build

                if shutil.which("ninja") is None:  # the pip package's binary, where its bin/ is not on PATH
                    import ninja
                    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
                # -mavx2 -mfma, not -march=native: an extensions directory shared by a cluster's nodes must not
                # hand an older CPU instructions it lacks (the GEMMs' own code is oneDNN's, chosen at run time).
                # Elsewhere (arm64) the C++ takes its portable loops.
                _say_if_building()
                flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
                if platform.machine().lower() in ("x86_64", "amd64"):
                    flags += ["-mavx2", "-mfma"]
                _ext = build(name="thinkrec_cpu", sources=[str(_DIR / s) for s in _SOURCES], extra_cflags=flags,
                             extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # a missing compiler, headers or linker: the torch paths run instead
                first = (str(e).strip().splitlines() or [""])[0][:200]
                warnings.warn(f"thinkrec_kernels: the C++ CPU kernels could not be built ({type(e).__name__}: "
                              f"{first}); SDPA's attention backward and torch's dropout run instead", stacklevel=3)
                _ext = False
    return _ext
