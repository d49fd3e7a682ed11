"""`yelp`: the Yelp Open Dataset JSON from --data-dir: reviews (`yelp_academic_dataset_review.json` or
`review.json`: user_id, business_id, stars, date "YYYY-MM-DD HH:MM:SS", taken as UTC) and businesses
(`..._business.json` or `business.json`: business_id, name, categories "A, B, C"). Files may be gzip
(by content, with or without .gz) and must be UTF-8. An empty id, a star count that is not a finite
number and a date that is empty or outside years 1..9999 are errors naming the line.
"""

from pathlib import Path

from ..errors import DataError, missing_file
from ..raw import RawLog
from ._columns import datetime_column, float_column, id_column, id_value, text_value
from ._read import jsonl_columns, read_jsonl

URL = "https://www.yelp.com/dataset (the JSON download)"


def _find(data_dir, kind: str) -> Path:
    if data_dir is None:
        raise DataError(f"yelp needs --data-dir with the Yelp Open Dataset JSON files; get them from {URL}")
    data_dir = Path(data_dir)
    names = [f"yelp_academic_dataset_{kind}.json", f"{kind}.json"]
    cands = [data_dir / n for n in names] + [data_dir / (n + ".gz") for n in names]
    for cand in cands:
        if cand.exists():
            return cand
    raise missing_file(f"yelp: {kind} file", cands, URL)


def _reviews(path):
    lines, (users, items, stars, dates) = jsonl_columns(path, ("user_id", "business_id", "stars", "date"))
    if not users:
        raise DataError(f"{path}: no reviews")
    line_of = lines.__getitem__
    return (id_column(path, line_of, "user_id", users), id_column(path, line_of, "business_id", items),
            float_column(path, line_of, "stars", stars), datetime_column(path, line_of, "date", dates))


def _business(path, wanted: set) -> dict:
    items = {}
    for line_no, obj in read_jsonl(path):
        bid = id_value(path, line_no, "business_id", obj.get("business_id") if isinstance(obj, dict) else None)
        if bid in wanted:
            items[bid] = {"title": text_value(obj.get("name")) or bid, "description": text_value(obj.get("categories"))}
    return items


def load(data_dir=None, **_) -> RawLog:
    reviews, business = _find(data_dir, "review"), _find(data_dir, "business")
    user, item, stars, stamp = _reviews(reviews)
    return RawLog(user, item, stars, stamp, None, _business(business, set(item.tolist())))
