"""Generated bad input at the boundaries a user hands us files through: every dataset source (the csv source's
interactions.csv / items.csv, ML-1M .dat, ML-100K's GroupLens and recbole files, Yelp and Amazon JSON lines),
infer.py's --input JSON Lines and its --candidates file. The promise under test: a call either succeeds or raises our
user-error type (DataError) whose message names the file and, for a bad row, its line; never another
exception, never a partial output.

CI runs each property with a fixed seed and a bounded number of examples; THINKREC_FUZZ_EXAMPLES=N runs N per
property (a long run), and the number of examples tried per boundary is printed at the end of the module.
"""

import codecs
import gzip
import re

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.fuzzing import count_report, fuzz_settings  # noqa: E402

from tests.test_train_cli import _tiny_csv  # noqa: E402
from thinkrec.data import DataError, prepare  # noqa: E402
from thinkrec.infer.rows import read_input  # noqa: E402

FUZZ = fuzz_settings(120)
TRIED = {"csv source": 0, "ml1m .dat": 0, "ml100k": 0, "yelp": 0, "amazon-book": 0, "infer.py --input": 0,
         "infer.py --candidates": 0}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


_report_counts = count_report(TRIED, "no traceback, no partial file")


# ------------------------------------------------------------------------------------------- generators
GOOD_INTER = ["1,3,1,1000,train", "1,4,0,1010,train", "2,3,1,2000,train", "2,5,0,2010,valid", "1,5,1,1020,test",
              "2,4,1,2020,test", "1,6,0,1030,valid"]
GOOD_ITEMS = ['3,"Movie 3 (1993)",Comedy', "4,Movie 4,Drama", "5,Movie 5,", "6,\"A, B\",Horror"]

field = st.one_of(
    st.sampled_from(["", " ", "1", "-1", "0", "2", "nan", "NaN", "inf", "-inf", "1e400", "9" * 40, "1.5", "train",
                     "valid", "test", "x", '"', '""', '"a,b"', "\t", "é", "\x00", "😀", "a" * 5000]),
    st.text(max_size=12),
)
row = st.lists(field, min_size=0, max_size=7).map(",".join)
line_end = st.sampled_from(["\n", "\r\n", "\r"])
json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 20), st.floats(allow_nan=True), st.text(max_size=8),
              st.sampled_from(["1", "3", "7", "999", ""])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["user_id", "item_id", "label", "title", "history", "timestamp", "x"]), inner, max_size=5),
    max_leaves=8)


@st.composite
def csv_file(draw, header: str, good: list):
    """A CSV file as bytes: the good rows with generated rows mixed in, maybe a BOM, a broken header, another
    encoding, a cut, or gzip (whole or truncated)."""
    rows = list(good)
    for _ in range(draw(st.integers(0, 3))):
        rows.insert(draw(st.integers(0, len(rows))), draw(row))
    head = draw(st.sampled_from([header, header, header.upper(), header.replace(",", ";"), "", "a,b"]))
    end = draw(line_end)
    text = end.join([head, *rows]) + draw(st.sampled_from(["", end, end * 3]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    data = text.encode(encoding, errors="replace")
    cut = draw(st.sampled_from([None, None, None, 0.5, 0.9]))
    if cut is not None:
        data = data[:int(len(data) * cut)]
    return _damaged(draw, data)


def _damaged(draw, data: bytes) -> bytes:
    """Maybe gzip `data` (whole or a truncated stream), maybe replace it by bytes that look like nothing."""
    if draw(st.integers(0, 5)) == 0:
        data = gzip.compress(data)
        if draw(st.booleans()):
            data = data[: max(1, len(data) // 2)]
    if draw(st.integers(0, 7)) == 0:
        data = draw(st.binary(max_size=200))
    return data


def _names_the_file(err: DataError, *paths) -> bool:
    return any(str(p) in str(err) or p.name in str(err) for p in paths)


# ------------------------------------------------------------------------------------------ csv source
@FUZZ
@given(inter=csv_file("user_id,item_id,label,timestamp,split", GOOD_INTER),
       items=csv_file("item_id,title,description", GOOD_ITEMS))
def test_csv_source_either_loads_or_names_the_file(tmp_path_factory, inter, items):
    TRIED["csv source"] += 1
    _loads_or_names_the_file(tmp_path_factory.mktemp("csv"), "csv", {"interactions.csv": inter, "items.csv": items},
                             r"csv source|--data-dir|rows?|split|label|user|item")


def _loads_or_names_the_file(d, dataset: str, files: dict, other: str) -> None:
    """prepare(dataset) on `files` written to d: it loads (and writes its data), or raises a one-line DataError
    naming one of the files (or, for a problem of the whole data, matching `other`) and writes nothing."""
    for name, data in files.items():
        (d / name).write_bytes(data)
    out = d / "out"
    try:
        prep = prepare(dataset, data_dir=d, out=out, quiet=True)
    except DataError as e:
        assert _names_the_file(e, *(d / n for n in files)) or re.search(other, str(e)), str(e)
        assert "Traceback" not in str(e) and "\n" not in str(e).strip(), str(e)
        assert not (out / "data" / "stats.json").exists()  # nothing half-written marks the data done
        assert not out.exists() or not list(out.rglob("*.tmp*"))  # no temporary file left behind
    else:
        assert (out / "data" / "stats.json").is_file() and len(prep.inter) > 0


# ------------------------------------------------------------------------------------------ ml1m .dat
# ratings in the paper's split months (2001-06 .. 2003-01), so the good rows alone split into train / valid / test
GOOD_RATINGS = ["1::10::5::993000000", "1::11::2::1020000000", "2::10::4::1040000000", "2::12::3::1036000000",
                "1::12::4::1039000000", "2::11::5::1021000000"]
GOOD_MOVIES = ["10::Heat (1995)::Action|Crime", "11::Toy Story (1995)::Animation|Comedy", "12::Misérables, Les (1995)::Drama"]
dat_field = st.one_of(field, st.sampled_from(["::", ":", "|", "5::", "::5"]))
dat_row = st.lists(dat_field, min_size=0, max_size=6).map("::".join)


@st.composite
def dat_file(draw, good: list):
    rows = list(good)
    for _ in range(draw(st.integers(0, 3))):
        rows.insert(draw(st.integers(0, len(rows))), draw(dat_row))
    end = draw(line_end)
    text = end.join(rows) + draw(st.sampled_from(["", end]))
    return _damaged(draw, text.encode(draw(st.sampled_from(["utf-8", "latin-1", "utf-16"])), errors="replace"))


@FUZZ
@given(ratings=dat_file(GOOD_RATINGS), movies=dat_file(GOOD_MOVIES))
def test_ml1m_dat_either_loads_or_names_the_file(tmp_path_factory, ratings, movies):
    TRIED["ml1m .dat"] += 1
    _loads_or_names_the_file(tmp_path_factory.mktemp("ml1m"), "ml1m", {"ratings.dat": ratings, "movies.dat": movies},
                             r"split|rows|user|item|label|MovieLens")


# -------------------------------------------------------------------------------------------- ml100k
# 20 ratings of 3 users on 2 items, one second apart in pairs: split 16 / 2 / 2 by global time
GOOD_UDATA = [f"{1 + k % 3}\t{1 + k % 2}\t{1 + k % 5}\t{1000 + k // 2}" for k in range(20)]
_FLAGS = "|".join("1" if i in (3, 5) else "0" for i in range(19))
GOOD_UITEM = [f"1|Toy Story (1995)|01-Jan-1995||http://x|{_FLAGS}", f"2|Heat (1995)|01-Jan-1995||http://y|{_FLAGS}"]
GOOD_INTER_ATOMIC = ["user_id:token\titem_id:token\trating:float\ttimestamp:float", *GOOD_UDATA]
GOOD_ITEM_ATOMIC = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
                    "1\tToy Story\t1995\tAnimation Comedy", "2\tHeat\t\tAction"]


@st.composite
def sep_file(draw, good: list, sep: str, encodings=("utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16")):
    """Separated rows as bytes: the good rows with generated rows (fields joined by `sep`, or by another
    separator) mixed in or replacing one, another encoding, a cut, gzip."""
    rows = list(good)
    other = st.lists(field, min_size=0, max_size=24).map(sep.join) | st.lists(field, max_size=6).map("|\t,".join)
    for _ in range(draw(st.integers(0, 3))):
        if rows and draw(st.booleans()):
            rows[draw(st.integers(0, len(rows) - 1))] = draw(other)
        else:
            rows.insert(draw(st.integers(0, len(rows))), draw(other))
    end = draw(line_end)
    text = end.join(rows) + draw(st.sampled_from(["", end, end * 2]))
    data = text.encode(draw(st.sampled_from(encodings)), errors="replace")
    cut = draw(st.sampled_from([None, None, None, 0.5, 0.95]))
    return _damaged(draw, data if cut is None else data[:int(len(data) * cut)])


@FUZZ
@given(data=sep_file(GOOD_UDATA, "\t"), item=sep_file(GOOD_UITEM, "|"))
def test_ml100k_grouplens_either_loads_or_names_the_file(tmp_path_factory, data, item):
    TRIED["ml100k"] += 1
    _loads_or_names_the_file(tmp_path_factory.mktemp("ml100k"), "ml100k", {"u.data": data, "u.item": item},
                             r"split|rows|user|item|label|MovieLens")


@FUZZ
@given(inter=sep_file(GOOD_INTER_ATOMIC, "\t"), item=sep_file(GOOD_ITEM_ATOMIC, "\t"))
def test_ml100k_recbole_either_loads_or_names_the_file(tmp_path_factory, inter, item):
    TRIED["ml100k"] += 1
    _loads_or_names_the_file(tmp_path_factory.mktemp("ml100k"), "ml100k",
                             {"ml-100k.inter": inter, "ml-100k.item": item}, r"split|rows|user|item|label|MovieLens")


# ----------------------------------------------------------------------------------- yelp, amazon-book
def _grid(n=22):
    """A full user x item grid: every user and item has 22 > 20 ratings (the sources' filter)."""
    return [(f"U{u}", f"I{i}", 1 + (u * n + i) % 5, u * n + i) for u in range(n) for i in range(n)]


json_odd = st.one_of(json_value, st.sampled_from([float("nan"), float("inf"), 1e308, -1, 2**63, 2**70, "", " ", "5",
                                                  "2015-13-40 25:61:61", "0000-01-01 00:00:00", [], {}]))


@st.composite
def json_lines_file(draw, objects: list, keys: tuple):
    """JSON Lines bytes: `objects` with a few fields replaced by generated values or dropped, generated lines
    mixed in, maybe a BOM, CRLF, stray bytes, gzip (whole or truncated)."""
    import json

    objs = [dict(o) for o in objects]
    for _ in range(draw(st.integers(0, 3))):
        o = objs[draw(st.integers(0, len(objs) - 1))]
        key = draw(st.sampled_from(keys))
        if draw(st.integers(0, 3)) == 0:
            o.pop(key, None)
        else:
            o[key] = draw(json_odd)
    lines = [json.dumps(o, allow_nan=True) for o in objs]
    for _ in range(draw(st.integers(0, 2))):
        bad = draw(st.one_of(json_value.map(json.dumps), st.text(max_size=20), st.just("{"), st.just("")))
        lines.insert(draw(st.integers(0, len(lines))), bad)
    data = draw(line_end).join(lines).encode("utf-8", errors="replace")
    if draw(st.integers(0, 3)) == 0:
        data = codecs.BOM_UTF8 + data
    if draw(st.integers(0, 4)) == 0:
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.binary(min_size=1, max_size=4)) + data[pos:]
    return _damaged(draw, data)


YELP_REVIEWS = [{"user_id": u, "business_id": i, "stars": r, "date": f"{2010 + k % 13}-0{1 + k % 9}-1{k % 10} 12:00:00"}
                for u, i, r, k in _grid()]
YELP_BUSINESS = [{"business_id": f"I{i}", "name": f"Cafe {i}", "categories": "Food, Coffee & Tea"} for i in range(22)]
AMAZON_REVIEWS = [{"reviewerID": u, "asin": i, "overall": float(r), "unixReviewTime": 1483228800 + k * 60000}
                  for u, i, r, k in _grid()]
AMAZON_META = [{"asin": f"I{i}", "title": f"Book {i}", "category": ["Books", "Mystery"], "description": ["A tale."]}
               for i in range(22)]


@FUZZ
@given(reviews=json_lines_file(YELP_REVIEWS, ("user_id", "business_id", "stars", "date")),
       business=json_lines_file(YELP_BUSINESS, ("business_id", "name", "categories")))
def test_yelp_either_loads_or_names_the_file(tmp_path_factory, reviews, business):
    TRIED["yelp"] += 1
    _loads_or_names_the_file(tmp_path_factory.mktemp("yelp"), "yelp", {"review.json": reviews, "business.json": business},
                             r"split|rows|reviews|user|item|label")


@FUZZ
@given(reviews=json_lines_file(AMAZON_REVIEWS, ("reviewerID", "asin", "overall", "unixReviewTime")),
       meta=json_lines_file(AMAZON_META, ("asin", "title", "category", "description")))
def test_amazon_either_loads_or_names_the_file(tmp_path_factory, reviews, meta):
    TRIED["amazon-book"] += 1
    _loads_or_names_the_file(tmp_path_factory.mktemp("amazon"), "amazon-book",
                             {"Books.json.gz": reviews, "meta_Books.json.gz": meta}, r"split|rows|reviews|user|item|label")


# --------------------------------------------------------------------------------------- infer --input
@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    _tiny_csv(d)
    return prepare("csv", data_dir=d, out=d / "run", quiet=True)


good_line = st.fixed_dictionaries({"user_id": st.sampled_from(["1", "2", 3]), "item_id": st.sampled_from(["3", "4", 5])},
                                  optional={"label": st.sampled_from([0, 1, None]),
                                            "timestamp": st.integers(0, 3000),
                                            "history": st.lists(st.fixed_dictionaries(
                                                {"item_id": st.sampled_from(["3", "4"]), "label": st.sampled_from([0, 1])}),
                                                max_size=3)})


@st.composite
def jsonl_file(draw):
    import json

    lines = [json.dumps(x) for x in draw(st.lists(good_line, min_size=0, max_size=4))]
    for _ in range(draw(st.integers(0, 3))):
        bad = draw(st.one_of(json_value.map(json.dumps), st.text(max_size=30), st.just("{"), st.just("")))
        lines.insert(draw(st.integers(0, len(lines))), bad)
    data = draw(line_end).join(lines).encode("utf-8", errors="replace")
    if draw(st.booleans()):
        data = codecs.BOM_UTF8 + data
    if draw(st.integers(0, 4)) == 0:
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.binary(min_size=1, max_size=4)) + data[pos:]  # stray bytes, maybe not UTF-8
    return data


@FUZZ
@given(data=jsonl_file(), allow_unknown=st.booleans())
def test_infer_input_either_reads_or_names_the_line(tmp_path_factory, prep, data, allow_unknown):
    TRIED["infer.py --input"] += 1
    path = tmp_path_factory.mktemp("input") / "rows.jsonl"
    path.write_bytes(data)
    try:
        rows = read_input(path, prep, allow_unknown=allow_unknown)
    except DataError as e:
        assert str(path) in str(e), str(e)
        assert re.search(r"rows\.jsonl(:\d+:| ?: no rows)", str(e)), str(e)
    else:
        assert len(rows) > 0 and len(rows.user) == len(rows.item) == len(rows.label) == len(rows.history)
        assert set(rows.label.tolist()) <= {-1, 0, 1}


# ----------------------------------------------------------------------------------- infer --candidates
@st.composite
def candidates_file(draw, known: list):
    lines = draw(st.lists(st.sampled_from(known) | st.text(max_size=6) | st.sampled_from(["", " ", "3 ", "\t4"]),
                          max_size=6))
    data = draw(line_end).join(lines).encode("utf-8", errors="replace")
    if draw(st.booleans()):
        data = codecs.BOM_UTF8 + data
    if draw(st.integers(0, 4)) == 0:
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + draw(st.binary(min_size=1, max_size=4)) + data[pos:]
    return data


@FUZZ
@given(data=st.data())
def test_infer_candidates_either_read_or_name_the_line(tmp_path_factory, prep, data):
    from types import SimpleNamespace

    from thinkrec.infer.rank import read_candidates

    TRIED["infer.py --candidates"] += 1
    known = [it["raw_id"] for it in prep.items]
    path = tmp_path_factory.mktemp("cand") / "items.txt"
    path.write_bytes(data.draw(candidates_file(known)))
    try:
        items = read_candidates(str(path), SimpleNamespace(prep=prep), 0)
    except DataError as e:
        assert re.search(r"items\.txt(:\d+:| ?: no candidate)", str(e)), str(e)
    else:
        ids = [ln.strip() for ln in path.read_bytes().decode("utf-8-sig").splitlines() if ln.strip()]
        assert [known[i] for i in items] == ids  # every line's id, in order (items are indexed in raw_id order)
