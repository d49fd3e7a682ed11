"""`ml1m`: MovieLens 1M (GroupLens). ratings.dat `UserID::MovieID::Rating::Timestamp`, movies.dat
`MovieID::Title::Genre1|Genre2`. Read from --data-dir (ml-1m.zip, or the extracted .dat files, directly
or under ml-1m/, plain or gzip), else from the cache, downloading the official zip and checking its md5.

The official movies.dat is latin-1 ("é" is the one byte e9); a copy converted to UTF-8 reads the same.
Each file is decoded as UTF-8 when it is valid UTF-8, else as latin-1: latin-1 text with accents is
essentially never valid UTF-8, and reading UTF-8 as latin-1 would garble every accent ("MisÃ©rables").
"""

import io
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError, malformed, missing_file
from ..raw import RawLog
from ._columns import float_column, id_column, int64_column
from ._fetch import cache_dir, download, verify_md5
from ._read import decode_text, read_text

URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
MD5 = "c4d9eecfca2ab87c1945afe126590906"  # published at URL + ".md5"
FILES = ("ratings.dat", "movies.dat")
ENCODINGS = ("utf-8", "latin-1")


def _open_files(data_dir) -> dict:
    """{name: (display path, text)} of ratings.dat and movies.dat from a directory, a zip, or the cache."""
    if data_dir is not None:
        data_dir = Path(data_dir)
        for base in (data_dir, data_dir / "ml-1m"):
            if all((base / f).exists() for f in FILES):
                return {f: (base / f, read_text(base / f, ENCODINGS)) for f in FILES}
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
                name = f"{zips[0]}!ml-1m/{f}"
                out[f] = (name, decode_text(name, z.read(f"ml-1m/{f}"), ENCODINGS))
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
        if not parts[0]:
            raise malformed(path, line_no, "MovieID is empty; every line needs one")
        items[parts[0]] = {"title": parts[1], "description": ", ".join(g for g in parts[2].split("|") if g)}
    return items


def parse_ratings(path, text: str):
    """-> users, items (str arrays), ratings float64 (finite), timestamps int64 (unix seconds)."""
    lines = text.splitlines()
    rows = [line.split("::") for line in lines if line]
    if not rows:
        raise DataError(f"{path}: no ratings")

    def line_of(i):  # the file line of row i (blank lines are skipped); only called to name a bad row
        return [n for n, line in enumerate(lines, 1) if line][i]
    try:
        arr = np.array(rows, dtype=object)
    except ValueError:  # rows of different lengths
        arr = None
    if arr is None or arr.ndim != 2 or arr.shape[1] != 4:
        bad = next(i for i, parts in enumerate(rows) if len(parts) != 4)
        raise malformed(path, line_of(bad), f"expected UserID::MovieID::Rating::Timestamp, got {'::'.join(rows[bad])!r}")
    user = id_column(path, line_of, "UserID", arr[:, 0].astype(str))
    item = id_column(path, line_of, "MovieID", arr[:, 1].astype(str))
    rating = float_column(path, line_of, "Rating", arr[:, 2])
    stamp = int64_column(path, line_of, "Timestamp (unix seconds)", arr[:, 3])
    return user, item, rating, stamp


def load(data_dir=None, **_) -> RawLog:
    files = _open_files(data_dir)
    items = parse_movies(*files["movies.dat"])
    user, item, rating, stamp = parse_ratings(*files["ratings.dat"])
    unknown = np.setdiff1d(np.unique(item), np.array(list(items), dtype=str))
    if len(unknown):
        raise DataError(f"{files['ratings.dat'][0]}: movie ids {unknown[:5].tolist()} are not in movies.dat")
    return RawLog(user, item, rating, stamp, None, items)
