"""Generated bad input at two boundaries a user hands us files through: the csv source (interactions.csv,
items.csv) and infer.py's --input JSON Lines. The promise under test: a call either succeeds or raises our
user-error type (DataError) whose message names the file and, for a bad row, its line; never another
exception, never a partial output.

CI runs each property with a fixed seed and a bounded number of examples; THINKREC_FUZZ_EXAMPLES=N runs N per
property (a long run), and the number of examples tried per boundary is printed at the end of the module.
"""

import codecs
import gzip
import os
import re

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_train_cli import _tiny_csv  # noqa: E402
from thinkrec.data import DataError, prepare  # noqa: E402
from thinkrec.infer.rows import read_input  # noqa: E402

EXAMPLES = int(os.environ.get("THINKREC_FUZZ_EXAMPLES", "120"))
LONG = "THINKREC_FUZZ_EXAMPLES" in os.environ  # a long run draws fresh examples; CI the same ones every time
FUZZ = settings(max_examples=EXAMPLES, derandomize=not LONG, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
TRIED = {"csv source": 0, "ml1m .dat": 0, "infer.py --input": 0}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    line = ("\nfuzz examples tried: " + ", ".join(f"{k} {v}" for k, v in TRIED.items())
            + " (every example passed: no traceback, no partial file)")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(line, flush=True)


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


# --------------------------------------------------------------------------------------- infer --input
@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    _tiny_csv(d)
    return prepare("csv", data_dir=d, out=d / "run", quiet=True)


json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 20), st.floats(allow_nan=True), st.text(max_size=8),
              st.sampled_from(["1", "3", "7", "999", ""])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["user_id", "item_id", "label", "title", "history", "timestamp", "x"]), inner, max_size=5),
    max_leaves=8)
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
