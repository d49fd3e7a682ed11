"""Readers never crash or silently misread: each odd input is read right or is a DataError naming file:line.

Small files per source (csv, ml1m, ml100k, yelp, amazon-book), each with one odd value on a known line.
"""

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from thinkrec.data import DataError
from thinkrec.data.sources import load

ITEMS = "item_id,title,description\n1,Toy Story (1995),Animation\n2,Heat (1995),Action\n"
INTER = "user_id,item_id,label,timestamp\n"
MOVIES = "1::Amélie (2001)::Comedy|Romance\n2::Heat (1995)::Action\n"
ATOMIC_ITEM = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n1\tToy Story\t1995\tAnimation\n"
ATOMIC_HEAD = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def write(d: Path, files: dict) -> Path:
    """Write {name: str (UTF-8) or bytes} into d."""
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return d


def yelp_line(user="u1", item="b1", stars=4, date="2020-01-01 12:00:00") -> str:
    return json.dumps({"user_id": user, "business_id": item, "stars": stars, "date": date}, ensure_ascii=False) + "\n"


def amazon_line(user="u1", asin="b1", overall=5.0, time=1500000000) -> str:
    return json.dumps({"reviewerID": user, "asin": asin, "overall": overall, "unixReviewTime": time}) + "\n"


def yelp_files(reviews: str) -> dict:
    return {"review.json": reviews, "business.json": json.dumps({"business_id": "b1", "name": "Cafe"}) + "\n"}


def amazon_files(reviews: str) -> dict:
    meta = json.dumps({"asin": "b1", "title": "A Book", "category": ["Books", "Mystery"]}) + "\n"
    return {"Books.json.gz": gzip.compress(reviews.encode()), "meta_Books.json.gz": gzip.compress(meta.encode())}


def raises_at(where: str, what: str, dataset: str, d: Path) -> str:
    """Load `dataset` from d, expecting a DataError that names `where` (file:line) and matches `what`."""
    with pytest.raises(DataError, match=what) as e:
        load(dataset, data_dir=d)
    msg = str(e.value)
    assert where in msg, f"expected {where!r} in: {msg}"
    assert "\n" not in msg, f"message spans lines: {msg}"
    return msg


# -- timestamps: nan, inf, -inf, beyond int64 --------------------------------------------------------------

BAD_TIMES = [("nan", "not a finite number"), ("inf", "not a finite number"), ("-inf", "not a finite number"),
             ("1e30", "beyond the int64 range"), ("99999999999999999999", "beyond the int64 range")]


@pytest.mark.parametrize("value,what", BAD_TIMES)
def test_csv_timestamp_not_finite_or_too_large(tmp_path, value, what):
    write(tmp_path, {"interactions.csv": INTER + f"1,1,1,100\n1,2,0,{value}\n", "items.csv": ITEMS})
    raises_at("interactions.csv:3", f"timestamp .*{what}", "csv", tmp_path)


@pytest.mark.parametrize("value,what", BAD_TIMES)
def test_ml1m_timestamp_not_finite_or_too_large(tmp_path, value, what):
    write(tmp_path, {"ratings.dat": f"1::1::5::978300760\n\n1::2::4::{value}\n", "movies.dat": MOVIES.encode("latin-1")})
    raises_at("ratings.dat:3", f"Timestamp .*{what}", "ml1m", tmp_path)  # line 3: the blank line counts


@pytest.mark.parametrize("value,what", BAD_TIMES)
def test_ml100k_timestamp_not_finite_or_too_large(tmp_path, value, what):
    write(tmp_path, {"ml-100k.inter": ATOMIC_HEAD + f"1\t1\t5\t881250949\n1\t1\t4\t{value}\n", "ml-100k.item": ATOMIC_ITEM})
    raises_at("ml-100k.inter:3", f"timestamp .*{what}", "ml100k", tmp_path)


@pytest.mark.parametrize("value,what", [(float("nan"), "not a finite number"), (float("inf"), "not a finite number"),
                                        (float("-inf"), "not a finite number"), (1e30, "beyond the int64 range"),
                                        (99999999999999999999, "beyond the int64 range"),
                                        (1.5, "not an integer"), (None, "not a number")])
def test_amazon_time_not_finite_or_too_large(tmp_path, value, what):
    write(tmp_path, amazon_files(amazon_line() + amazon_line(time=value)))  # json writes NaN / Infinity
    raises_at("Books.json.gz:2", f"unixReviewTime .*{what}", "amazon-book", tmp_path)


@pytest.mark.parametrize("date", ["", "NaT", "nan", None, "99999999999999999999-01-01 00:00:00", "999999999999-01-01"])
def test_yelp_date_empty_or_out_of_range(tmp_path, date):
    # numpy reads "" and "NaT" as NaT and wraps past int64 seconds (year 999999999999 -> -169108098509)
    write(tmp_path, yelp_files(yelp_line() + yelp_line(date=date)))
    raises_at("review.json:2", "not a date", "yelp", tmp_path)


def test_whole_float_timestamps_read_exactly(tmp_path):
    write(tmp_path / "c", {"interactions.csv": INTER + "1,1,1,1.5e9\n1,2,0,-5\n", "items.csv": ITEMS})
    assert load("csv", data_dir=tmp_path / "c").timestamp.tolist() == [1500000000, -5]
    write(tmp_path / "a", amazon_files(amazon_line(time=1500000000.0) + amazon_line(time=2**62)))
    assert load("amazon-book", data_dir=tmp_path / "a").timestamp.tolist() == [1500000000, 2**62]


@pytest.mark.parametrize("dataset,files,where", [
    ("yelp", yelp_files(yelp_line() + yelp_line(stars=float("nan"))), "review.json:2"),
    ("ml1m", {"ratings.dat": "1::1::5::978300760\n1::2::inf::978300760\n", "movies.dat": MOVIES}, "ratings.dat:2"),
    ("amazon-book", amazon_files(amazon_line(overall=float("nan"))), "Books.json.gz:1"),
])
def test_rating_not_finite(tmp_path, dataset, files, where):
    raises_at(where, "not a finite number", dataset, write(tmp_path, files))


# -- gzip by content, not by name -------------------------------------------------------------------------

def test_gzip_without_gz_name_is_read_as_gzip(tmp_path):
    write(tmp_path / "c", {"interactions.csv": gzip.compress((INTER + "7,2,1,100\n").encode()), "items.csv": ITEMS})
    log = load("csv", data_dir=tmp_path / "c")
    assert log.user.tolist() == ["7"] and log.timestamp.tolist() == [100]
    files = yelp_files(yelp_line(user="u9"))
    write(tmp_path / "y", {"review.json": gzip.compress(files["review.json"].encode()), "business.json": files["business.json"]})
    assert load("yelp", data_dir=tmp_path / "y").user.tolist() == ["u9"]
    plain_names = {k.removesuffix(".gz"): v for k, v in amazon_files(amazon_line(user="r7")).items()}
    assert load("amazon-book", data_dir=write(tmp_path / "a", plain_names)).user.tolist() == ["r7"]
    write(tmp_path / "m", {"ratings.dat": gzip.compress(b"3::2::4::978300760\n"), "movies.dat": MOVIES.encode("latin-1")})
    assert load("ml1m", data_dir=tmp_path / "m").user.tolist() == ["3"]


def test_gz_name_without_gzip_data(tmp_path):
    write(tmp_path / "c", {"interactions.csv.gz": INTER + "1,1,1,100\n", "items.csv": ITEMS})
    raises_at("interactions.csv.gz", "named .gz but not gzip data", "csv", tmp_path / "c")
    write(tmp_path / "a", {"Books.json.gz": amazon_line(), "meta_Books.json.gz": amazon_files("")["meta_Books.json.gz"]})
    raises_at("Books.json.gz", "named .gz but not gzip data", "amazon-book", tmp_path / "a")


def test_truncated_gzip(tmp_path):
    data = gzip.compress((INTER + "1,1,1,100\n" * 20000).encode())
    write(tmp_path, {"interactions.csv.gz": data[:-64], "items.csv": ITEMS})
    raises_at("interactions.csv.gz", "corrupt or truncated after line", "csv", tmp_path)


# -- csv: long fields, open quotes ------------------------------------------------------------------------

def test_csv_field_over_default_limit_is_read(tmp_path):
    description = "long " * 40_000  # 200000 chars, over csv's default field limit of 131072
    write(tmp_path, {"interactions.csv": INTER + "1,3,1,100\n", "items.csv": ITEMS + f'3,Long,"{description}"\n'})
    assert load("csv", data_dir=tmp_path).items["3"]["description"] == description.strip()


def test_csv_quote_left_open_names_its_line(tmp_path):
    # without the check csv reads lines 2..4 as one title and the file as one item
    items = 'item_id,title,description\n1,"Toy Story (1995),Animation\n2,Heat (1995),Action\n3,Up,Animation\n'
    write(tmp_path, {"interactions.csv": INTER + "1,1,1,100\n", "items.csv": items})
    raises_at("items.csv:2", "quote opened here is never closed", "csv", tmp_path)


def test_csv_line_break_inside_a_field_names_its_first_line(tmp_path):
    items = 'item_id,title,description\n1,"Toy\nStory",Animation\n2,Heat,Action\n'
    write(tmp_path, {"interactions.csv": INTER + "1,1,1,100\n", "items.csv": items})
    raises_at("items.csv:2", "runs from here to line 3", "csv", tmp_path)


def test_csv_open_quote_closed_by_a_later_quote_names_its_line(tmp_path):
    inter = INTER + '1,1,1,100\n1,"2,0,200\n1,1,1,300\n2,"1",1,400\n'
    write(tmp_path, {"interactions.csv": inter, "items.csv": ITEMS})
    raises_at("interactions.csv:3", "bad CSV quoting", "csv", tmp_path)


# -- encodings --------------------------------------------------------------------------------------------

def test_csv_not_utf8_names_line_encoding_and_iconv(tmp_path):
    write(tmp_path, {"interactions.csv": INTER + "1,1,1,100\n",
                     "items.csv": (ITEMS + "3,Amélie (2001),Comedy\n").encode("latin-1")})
    msg = raises_at("items.csv:4", "not UTF-8", "csv", tmp_path)
    assert "byte 0xe9 at column 5" in msg and "iconv -f latin1 -t utf-8" in msg


def test_jsonl_not_utf8_far_into_the_file(tmp_path):
    reviews = yelp_line() * 30_000 + yelp_line(user="Zoë")  # past the first chunk and the codec's buffer
    write(tmp_path, yelp_files(reviews.encode("latin-1")))
    raises_at("review.json:30001", "not UTF-8", "yelp", tmp_path)


def test_ml1m_latin1_and_utf8_movies_read_the_same(tmp_path):
    ratings = "1::1::5::978300760\n"
    a = load("ml1m", data_dir=write(tmp_path / "a", {"ratings.dat": ratings, "movies.dat": MOVIES.encode("latin-1")}))
    b = load("ml1m", data_dir=write(tmp_path / "b", {"ratings.dat": ratings, "movies.dat": MOVIES.encode("utf-8")}))
    assert a.items["1"]["title"] == b.items["1"]["title"] == "Amélie (2001)"


def test_utf8_bom_is_dropped(tmp_path):
    bom = "\ufeff"
    write(tmp_path / "c", {"interactions.csv": bom + INTER + "5,1,1,100\n", "items.csv": bom + ITEMS})
    log = load("csv", data_dir=tmp_path / "c")  # a kept BOM would make the header '\ufeffuser_id'
    assert log.user.tolist() == ["5"] and set(log.items) == {"1", "2"}
    files = yelp_files(bom + yelp_line(user="u5"))
    assert load("yelp", data_dir=write(tmp_path / "y", files)).user.tolist() == ["u5"]
    m = load("ml1m", data_dir=write(tmp_path / "m", {"ratings.dat": bom + "5::1::4::978300760\n",
                                                     "movies.dat": (bom + MOVIES).encode()}))
    assert m.user.tolist() == ["5"] and "1" in m.items


# -- empty ids --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset,files,where,what", [
    ("csv", {"interactions.csv": INTER + "1,1,1,100\n,2,0,200\n", "items.csv": ITEMS}, "interactions.csv:3", "user_id"),
    ("csv", {"interactions.csv": INTER + "1, ,1,100\n", "items.csv": ITEMS}, "interactions.csv:2", "item_id"),
    ("csv", {"interactions.csv": INTER + "1,1,1,100\n", "items.csv": ITEMS + ",Nameless,\n"}, "items.csv:4", "item_id"),
    ("yelp", yelp_files(yelp_line() + yelp_line(user="")), "review.json:2", "user_id"),
    ("yelp", yelp_files(yelp_line() + yelp_line(item=None)), "review.json:2", "business_id"),
    ("amazon-book", amazon_files(amazon_line() + amazon_line(asin="")), "Books.json.gz:2", "asin"),
    ("ml1m", {"ratings.dat": "1::1::5::978300760\n::2::4::978300760\n", "movies.dat": MOVIES}, "ratings.dat:2", "UserID"),
    ("ml100k", {"ml-100k.inter": ATOMIC_HEAD + "1\t\t5\t881250949\n", "ml-100k.item": ATOMIC_ITEM}, "ml-100k.inter:2", "item id"),
])
def test_empty_id(tmp_path, dataset, files, where, what):
    raises_at(where, re.escape(what) + " is empty", dataset, write(tmp_path, files))


def test_ids_stay_strings(tmp_path):
    log = load("yelp", data_dir=write(tmp_path, yelp_files(yelp_line(user="007") + yelp_line(user="7"))))
    assert log.user.tolist() == ["007", "7"] and log.user.dtype.kind == "U"
    assert np.array_equal(log.timestamp, [1577880000] * 2)  # 2020-01-01 12:00:00 UTC
