"""`ml1m`: MovieLens 1M (GroupLens). ratings.dat `UserID::MovieID::Rating::Timestamp`, movies.dat
`MovieID::Title::Genre1|Genre2`, latin-1. Read from --data-dir (ml-1m.zip, or the extracted .dat files,
directly or under ml-1m/), else from the cache, downloading the official zip and checking its md5.
"""

import io
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError, malformed, missing_file
from ..raw import RawLog
from ._fetch import cache_dir, download, verify_md5

URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
MD5 = "c4d9eecfca2ab87c1945afe126590906"  # published at URL + ".md5"
FILES = ("ratings.dat", "movies.dat")


def _open_files(data_dir) -> dict:
    """{name: (display path, text)} of ratings.dat and movies.dat from a directory, a zip, or the cache."""
    if data_dir is not None:
        data_dir = Path(data_dir)
        for base in (data_dir, data_dir / "ml-1m"):
            if all((base / f).exists() for f in FILES):
                return {f: (base / f, (base / f).read_bytes().decode("latin-1")) for f in FILES}
        zips = [data_dir / "ml-1m.zip"]
        looked = [data_dir / f for f in FILES] + [data_dir / "ml-1m" / f for f in FILES] + zips
    else:
        zips = [cache_dir() / "ml-1m.zip"]
        looked = zips
        if not zips[0].exists():
            download(URL, zips[0], MD5)
    if not zips[0].exists():
        raise missing_file("MovieLens-1M (ratings.dat + movies.dat, or ml-1m.zip)", looked, URL)
    if data_dir is None:
        verify_md5(zips[0], MD5, URL)
    out = {}
    with zipfile.ZipFile(zips[0]) as z:
        for f in FILES:
            try:
                out[f] = (f"{zips[0]}!ml-1m/{f}", z.read(f"ml-1m/{f}").decode("latin-1"))
            except KeyError:
                raise missing_file(f"ml-1m/{f}", [zips[0]], URL) from None
    return out


def parse_movies(path, text: str) -> dict:
    items = {}
    for line_no, line in enumerate(io.StringIO(text), 1):
        line = line.rstrip("\r\n")
        if not line:
            continue
        parts = line.split("::")
        if len(parts) != 3:
            raise malformed(path, line_no, f"expected MovieID::Title::Genres, got {line!r}")
        items[parts[0]] = {"title": parts[1], "description": ", ".join(g for g in parts[2].split("|") if g)}
    return items


def parse_ratings(path, text: str):
    """-> users, items (str arrays), ratings float64, timestamps int64."""
    rows = [line.split("::") for line in text.splitlines() if line]
    try:
        arr = np.array(rows, dtype=object)
        if arr.ndim != 2 or arr.shape[1] != 4:
            raise ValueError
        rating = arr[:, 2].astype(np.float64)
        stamp = arr[:, 3].astype(np.int64)
    except (ValueError, TypeError):  # slow path only to find and name the bad line
        for line_no, line in enumerate(text.splitlines(), 1):
            parts = line.split("::")
            if line and (len(parts) != 4 or not parts[2].strip().isdigit() or not parts[3].strip().isdigit()):
                raise malformed(path, line_no, f"expected UserID::MovieID::Rating::Timestamp, got {line!r}") from None
        raise
    return arr[:, 0].astype(str), arr[:, 1].astype(str), rating, stamp


def load(data_dir=None, **_) -> RawLog:
    files = _open_files(data_dir)
    items = parse_movies(*files["movies.dat"])
    user, item, rating, stamp = parse_ratings(*files["ratings.dat"])
    unknown = np.setdiff1d(np.unique(item), np.array(list(items), dtype=str))
    if len(unknown):
        raise DataError(f"{files['ratings.dat'][0]}: movie ids {unknown[:5].tolist()} are not in movies.dat")
    return RawLog(user, item, rating, stamp, None, items)
