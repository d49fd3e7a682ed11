"""thinkrec.runtime.tune_malloc: applied once, in a fresh process, and switchable off."""

import subprocess
import sys

CODE = "from thinkrec.runtime import tune_malloc; print(tune_malloc(), tune_malloc())"


def _run(env_extra):
    import os

    env = {**os.environ, **env_extra}
    env.pop("THINKREC_DEFAULT_MALLOC", None) if not env_extra else None
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, check=True).stdout.split()


def test_tune_malloc_applies_on_glibc_and_can_be_turned_off():
    import platform

    on = _run({})
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert on == ["True", "True"]
    else:
        assert on == ["False", "False"]
    assert _run({"THINKREC_DEFAULT_MALLOC": "1"}) == ["False", "False"]
