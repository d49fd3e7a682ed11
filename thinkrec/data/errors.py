"""Errors of the data layer: every message says what is wrong, which file and line, and what to do."""

from pathlib import Path

from thinkrec.errors import UserError


class DataError(UserError, ValueError):
    """A data file is missing, malformed, or gives an empty/inconsistent log."""


def missing_file(what: str, looked: list, url: str | None = None, hint: str | None = None) -> DataError:
    """Build the error for a file that is not there: what is missing, every place looked, where to get it."""
    places = "\n".join(f"  - {Path(p)}" for p in looked)
    msg = f"{what} not found. Looked in:\n{places}"
    if url:
        msg += f"\nDownload it from {url}"
    if hint:
        msg += f"\n{hint}"
    return DataError(msg)


def malformed(path, line: int, why: str) -> DataError:
    """Build the error for a bad line; `line` is 1-based as an editor shows it."""
    return DataError(f"{path}:{line}: {why}")


def text_lines(path):
    """(line number, text) of every non-blank line of a UTF-8 text file; a line that is not UTF-8 is a DataError
    naming the file and line. A UTF-8 byte order mark and CRLF line ends are accepted, as the CSV readers
    accept them."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise malformed(path, line_no, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                               f"save the file as UTF-8") from None
            if line.strip():
                yield line_no, line


def json_lines(path):
    """(line number, parsed value) of every non-blank line of a JSON Lines file (read as `text_lines`); a line
    that is not JSON is a DataError naming the file and line."""
    import json

    for line_no, line in text_lines(path):
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as e:
            raise malformed(path, line_no, f"not JSON ({e.msg} at column {e.colno})") from None
