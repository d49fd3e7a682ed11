"""`amazon-book`: the 2018 Amazon review dump (Ni, Li, McAuley, EMNLP 2019), Books category, from
--data-dir: `Books.json.gz` (reviews: reviewerID, asin, overall, unixReviewTime) and
`meta_Books.json.gz` (asin, title, description, category). Titles verbatim; the description is the
categories without the top-level "Books" (the keyword file, when given, replaces it in prompts).
Files are read as gzip or plain by content, whatever the name; they must be UTF-8. An empty id, a rating
that is not a finite number and a time that is not an integer in int64 are errors naming the line.
"""

from pathlib import Path

from ..errors import DataError, malformed, missing_file
from ..raw import RawLog
from ._columns import float_column, id_column, id_value, int64_column, text_value
from ._read import jsonl_columns, read_jsonl

URL = "https://nijianmo.github.io/amazon/index.html (files Books.json.gz and meta_Books.json.gz)"
REVIEWS, META = "Books.json.gz", "meta_Books.json.gz"


def _find(data_dir, name: str) -> Path:
    if data_dir is None:
        raise DataError(f"amazon-book needs --data-dir with {REVIEWS} and {META}; get them from {URL}")
    data_dir = Path(data_dir)
    for cand in (data_dir / name, data_dir / name.removesuffix(".gz")):
        if cand.exists():
            return cand
    raise missing_file(f"amazon-book: {name}", [data_dir / name, data_dir / name.removesuffix(".gz")], URL)


def _reviews(path):
    lines, (users, items, ratings, stamps) = jsonl_columns(path, ("reviewerID", "asin", "overall", "unixReviewTime"))
    if not users:
        raise DataError(f"{path}: no reviews")
    line_of = lines.__getitem__
    return (id_column(path, line_of, "reviewerID", users), id_column(path, line_of, "asin", items),
            float_column(path, line_of, "overall", ratings),
            int64_column(path, line_of, "unixReviewTime (unix seconds)", stamps))


def _meta(path, wanted: set) -> dict:
    items = {}
    for line_no, obj in read_jsonl(path):
        asin = id_value(path, line_no, "asin", obj.get("asin") if isinstance(obj, dict) else None)
        if asin not in wanted:
            continue
        cats = obj.get("category")
        cats = [cats] if isinstance(cats, str) else [] if cats is None else cats
        if not isinstance(cats, list):
            raise malformed(path, line_no, f"category = {cats!r} is not a list of strings")
        cats = [text_value(c) for c in cats]
        items[asin] = {"title": text_value(obj.get("title")) or asin,
                       "description": ", ".join(c for c in cats if c and c != "Books"),
                       "text": text_value(obj.get("description"))[:2000]}
    return items


def load(data_dir=None, **_) -> RawLog:
    reviews, meta = _find(data_dir, REVIEWS), _find(data_dir, META)
    user, item, rating, stamp = _reviews(reviews)
    items = _meta(meta, set(item.tolist()))
    return RawLog(user, item, rating, stamp, None, items)
