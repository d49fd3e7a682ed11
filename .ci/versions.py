"""The installed versions against constraints.txt (the tested set).

    python .ci/versions.py diff      # the packages whose installed version differs from constraints.txt:
                                     # one "name tested newest" line each (newest = installed here)
    python .ci/versions.py write     # rewrite constraints.txt's pins from this environment (header kept)

Used by .ci/newest, which installs the newest versions pyproject.toml allows and names the package that breaks us.
"""

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
SKIP = {"thinkrec", "pip", "setuptools", "wheel"}  # the project itself and the installer


def pinned() -> dict[str, str]:
    """{canonical name: version} from constraints.txt."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return pins


def installed() -> dict[str, str]:
    """{canonical name: version} of this environment, local labels (+cpu) dropped."""
    out = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name not in SKIP:
            out[name] = dist.version.split("+")[0]
    return out


def diff() -> list[tuple[str, str, str]]:
    """(name, tested, installed) for each package that differs; '-' where one side lacks it."""
    pins, have = pinned(), installed()
    return [(n, pins.get(n, "-"), have.get(n, "-")) for n in sorted(set(pins) | set(have))
            if pins.get(n) != have.get(n)]


def write() -> None:
    header = [line for line in CONSTRAINTS.read_text().splitlines() if line.startswith("#")]
    pins = [f"{n}=={v}" for n, v in sorted(installed().items())]
    tmp = CONSTRAINTS.with_suffix(".tmp")
    tmp.write_text("\n".join(header + pins) + "\n")
    tmp.replace(CONSTRAINTS)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "diff":
        for row in diff():
            print(*row)
    elif cmd == "write":
        write()
    else:
        sys.exit("usage: python .ci/versions.py diff|write")
