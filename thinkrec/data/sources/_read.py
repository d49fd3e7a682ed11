"""Shared readers: CSV with header checks and line-numbered errors, JSON Lines (plain or gzip)."""

import csv
import gzip
import json
from itertools import islice
from operator import itemgetter
from pathlib import Path

from tqdm import tqdm

from ..errors import DataError, malformed


def open_text(path, encoding="utf-8"):
    """Open a text file, transparently gunzipping `*.gz`."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def read_csv(path, required: tuple, optional: tuple = ()):
    """Yield `(line_number, row_dict)` for each data row of a CSV file with a header.

    Checks the header holds every `required` column and that each row has as many fields as the header.
    Row dicts hold the required and present optional columns as stripped strings.
    """
    with open_text(path) as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: empty file, expected a header {','.join(required)}") from None
        absent = [c for c in required if c not in header]
        if absent:
            expected = list(required) + [f"[{o}]" for o in optional]
            raise malformed(path, 1, f"header {header} lacks column(s) {absent}; expected {expected}")
        cols = [(c, header.index(c)) for c in required + tuple(o for o in optional if o in header)]
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                raise malformed(path, line, f"{len(row)} fields, header has {len(header)}: {row!r}")
            yield line, {c: row[i].strip() for c, i in cols}


def read_jsonl(path, encoding="utf-8", chunk_lines: int = 20_000):
    """Yield `(line_number, object)` for each non-empty line of a JSON Lines file (plain or .gz)."""
    for numbers, objs in read_jsonl_chunks(path, encoding, chunk_lines):
        yield from zip(numbers, objs)


def jsonl_columns(path, fields: tuple, encoding="utf-8") -> tuple:
    """Read `fields` of every line of a JSON Lines file -> (line numbers, [one list per field]).

    Columns are pulled with a C-level itemgetter per chunk (no Python frame per line); a line lacking a
    field, or not an object, is found and named only when a chunk fails.
    """
    get = itemgetter(*fields)
    cols, line_numbers = [[] for _ in fields], []
    for numbers, objs in read_jsonl_chunks(path, encoding):
        line_numbers.extend(numbers)
        try:
            rows = list(map(get, objs))
        except (KeyError, TypeError):
            for n, o in zip(numbers, objs):
                if not isinstance(o, dict) or any(f not in o for f in fields):
                    missing = [f for f in fields if not isinstance(o, dict) or f not in o]
                    raise malformed(path, n, f"missing field(s) {missing}; each line needs {list(fields)}") from None
            raise
        for col, values in zip(cols, zip(*rows) if rows else [() for _ in fields]):
            col.extend(values)
    return line_numbers, cols


def read_jsonl_chunks(path, encoding="utf-8", chunk_lines: int = 20_000):
    """Yield `(line_numbers, objects)` per chunk of a JSON Lines file (plain or .gz).

    Lines are decoded a chunk at a time as one JSON array ("[" + ",".join(lines) + "]"): one call into
    the C decoder per chunk instead of one Python-level json.loads per line (2.5x faster on 2M Yelp
    reviews). A chunk that fails is decoded line by line to name the bad line. A tqdm bar (in lines)
    shows for files over 256 MB: the Amazon Books dump takes minutes to parse.
    """
    big = Path(path).stat().st_size > (256 << 20)
    with open_text(path, encoding) as f, tqdm(desc=Path(path).name, unit=" lines", mininterval=2.0,
                                               disable=not big) as bar:
        line_no = 0
        while True:
            lines = list(islice(f, chunk_lines))
            if not lines:
                return
            numbers = range(line_no + 1, line_no + len(lines) + 1)
            line_no += len(lines)
            bar.update(len(lines))
            if any(ln.isspace() for ln in lines):  # rare: drop blank lines, keep the others' numbers
                numbers = [n for n, ln in zip(numbers, lines) if not ln.isspace()]
                lines = [ln for ln in lines if not ln.isspace()]
                if not lines:
                    continue
            try:
                objs = json.loads("[" + ",".join(lines) + "]")
            except json.JSONDecodeError:
                objs = None
            if objs is None or len(objs) != len(lines):  # e.g. a line "{..}, {..}" would shift the rest
                objs = [_decode_line(path, n, ln) for n, ln in zip(numbers, lines)]
            yield numbers, objs


def _decode_line(path, line_no: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise malformed(path, line_no, f"invalid JSON ({e.msg} at column {e.colno})") from None


def parse_int(path, line, name, text) -> int:
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise malformed(path, line, f"{name} = {text!r} is not a number") from None
        if value != int(value):
            raise malformed(path, line, f"{name} = {text!r} is not an integer")
        return int(value)

