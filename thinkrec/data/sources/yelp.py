"""`yelp`: the Yelp Open Dataset JSON from --data-dir: reviews (`yelp_academic_dataset_review.json` or
`review.json`: user_id, business_id, stars, date "YYYY-MM-DD HH:MM:SS", taken as UTC) and businesses
(`..._business.json` or `business.json`: business_id, name, categories "A, B, C").
"""

from pathlib import Path

import numpy as np

from ..errors import DataError, malformed, missing_file
from ..raw import RawLog
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
    try:
        stars = np.array(stars, dtype=np.float64)
    except (TypeError, ValueError):
        bad = next(i for i, v in enumerate(stars) if not _is_number(v))
        raise malformed(path, lines[bad], f"stars = {stars[bad]!r} is not a number") from None
    try:
        stamp = np.array(dates, dtype="datetime64[s]").astype(np.int64)
    except ValueError:
        bad = next(i for i, d in enumerate(dates) if not _is_date(d))
        raise malformed(path, lines[bad], f"date {dates[bad]!r} is not 'YYYY-MM-DD HH:MM:SS'") from None
    return np.array(users).astype(str), np.array(items).astype(str), stars, stamp


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _is_date(text: str) -> bool:
    try:
        np.datetime64(text, "s")
        return True
    except ValueError:
        return False


def _business(path, wanted: set) -> dict:
    items = {}
    for line_no, obj in read_jsonl(path):
        bid = obj.get("business_id") if isinstance(obj, dict) else None
        if bid is None:
            raise malformed(path, line_no, "business line without a business_id")
        if bid in wanted:
            items[bid] = {"title": " ".join(str(obj.get("name") or bid).split()),
                          "description": obj.get("categories") or ""}
    return items


def load(data_dir=None, **_) -> RawLog:
    reviews, business = _find(data_dir, "review"), _find(data_dir, "business")
    user, item, stars, stamp = _reviews(reviews)
    return RawLog(user, item, stars, stamp, None, _business(business, set(item.tolist())))
