"""Parsed values -> checked numpy columns: ids, finite numbers, int64 timestamps, dates.

Each `*_column(path, line_of, name, values)` converts a whole column with one C-level numpy call and
checks it vectorised (empty ids, nan/inf, beyond int64); only when that fails does it walk the values in
Python to name the first bad one as `path:line` (`line_of(i)` is the line of value i). `values` are
strings (text formats) or JSON values.
"""

import math

import numpy as np

from ..errors import malformed

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
# numpy parses years of any width and wraps silently past int64 seconds (year 999999999999 reads as
# -169108098509); every real date lies in years 1..9999, so anything outside is an error.
FIRST_SECOND, LAST_SECOND = np.datetime64("0001-01-01T00:00:00", "s"), np.datetime64("9999-12-31T23:59:59", "s")


def parse_int(path, line: int, name: str, value) -> int:
    """A str or JSON number -> int: "12", " 12 ", "12.0", "1.2e3", 12, 12.0; not nan, inf, 1.5, true, or
    a value outside int64 (1e30, 99999999999999999999)."""
    number = _number(path, line, name, value)
    if isinstance(number, float):
        if not number.is_integer():
            raise malformed(path, line, f"{name} = {value!r} is not an integer")
        number = int(number)
    if not INT64_MIN <= number <= INT64_MAX:
        raise malformed(path, line, f"{name} = {value!r} is beyond the int64 range")
    return number


def parse_float(path, line: int, name: str, value) -> float:
    """A str or JSON number -> a finite float (not nan, inf, true)."""
    return float(_number(path, line, name, value))


def _number(path, line, name, value):
    """-> int or finite float; DataError for anything else."""
    number = value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise malformed(path, line, f"{name} = {value!r} is not a number") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise malformed(path, line, f"{name} = {value!r} is not a number")
    if isinstance(number, float) and not math.isfinite(number):
        raise malformed(path, line, f"{name} = {value!r} is not a finite number")
    return number


def int64_column(path, line_of, name: str, values) -> np.ndarray:
    """[n] str / JSON numbers -> [n] int64; whole floats ("1.2e9", 1200000000.0) are accepted."""
    try:
        arr = np.asarray(values)
        if arr.ndim == 1 and arr.dtype.kind == "i":
            return arr.astype(np.int64, copy=False)
        if arr.ndim == 1 and arr.dtype.kind in "OU":  # int() per element: 'nan', '1.5' or too large fail
            return arr.astype(np.int64)
        if arr.ndim == 1 and arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all() \
                and arr.min(initial=0) >= INT64_MIN and arr.max(initial=0) < 2.0**63:
            return arr.astype(np.int64)
    except (ValueError, TypeError, OverflowError):
        pass
    return np.array([parse_int(path, line_of(i), name, v) for i, v in enumerate(values)], dtype=np.int64)


def float_column(path, line_of, name: str, values) -> np.ndarray:
    """[n] str / JSON numbers -> [n] finite float64."""
    try:
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim == 1 and np.isfinite(arr).all():
            return arr
    except (ValueError, TypeError):
        pass
    return np.array([parse_float(path, line_of(i), name, v) for i, v in enumerate(values)], dtype=np.float64)


def id_column(path, line_of, name: str, values) -> np.ndarray:
    """[n] ids (non-empty strings; JSON integers are taken as their digits) -> [n] str."""
    try:
        arr = np.asarray(values)
    except ValueError:  # e.g. ids that are lists of different lengths
        arr = None
    if arr is not None and arr.ndim == 1:
        if arr.dtype.kind == "U" and not (arr == "").any():
            return arr
        if arr.dtype.kind == "i":
            return arr.astype(str)
    for i, v in enumerate(values):
        if v is None or v == "":
            raise malformed(path, line_of(i), f"{name} is empty; every row needs one")
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise malformed(path, line_of(i), f"{name} = {v!r} is not a string")
    return np.array([str(v) for v in values])


def id_value(path, line: int, name: str, value) -> str:
    """One id of a metadata line, as id_column takes a column's: a non-empty string, or a JSON integer as its
    digits; anything else is an error naming the line."""
    if value is None or value == "":
        raise malformed(path, line, f"{name} is missing or empty; every line needs one")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise malformed(path, line, f"{name} = {value!r} is not a string")
    return str(value)


def text_value(value) -> str:
    """A free-text metadata field as one line: a list's parts joined by spaces, whitespace runs collapsed,
    missing = ""."""
    if isinstance(value, list):
        value = " ".join(str(v) for v in value)
    return " ".join(str("" if value is None else value).split())


def datetime_column(path, line_of, name: str, values, form: str = "YYYY-MM-DD HH:MM:SS") -> np.ndarray:
    """[n] date strings (ISO 8601 as numpy reads them, taken as UTC) -> [n] int64 unix seconds.

    An empty or "NaT" date (numpy reads both as NaT) and a year outside 1..9999 are errors. A JSON
    integer is taken as unix seconds, as numpy does.
    """
    try:
        stamp = np.array(values, dtype="datetime64[s]")
        bad = np.isnat(stamp) | (stamp < FIRST_SECOND) | (stamp > LAST_SECOND)
        if stamp.ndim == 1 and not bad.any():
            return stamp.astype(np.int64)
    except (ValueError, TypeError, OverflowError):
        pass
    stamps = []
    for i, v in enumerate(values):
        try:
            t = np.datetime64(v, "s")
        except (ValueError, TypeError, OverflowError):
            t = None
        if t is None or np.isnat(t) or not FIRST_SECOND <= t <= LAST_SECOND:
            raise malformed(path, line_of(i), f"{name} {v!r} is not a date '{form}' in years 1..9999")
        stamps.append(t)
    return np.array(stamps, dtype="datetime64[s]").astype(np.int64)
