"""Every source format from small synthetic raw files: splits, labels, errors naming file and line."""

import calendar
import gzip
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from thinkrec.data import DataError, load_prepared, prepare
from thinkrec.data import splits as split_rules
from thinkrec.data.prepared import SPLITS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml1m-collm"


def utc(y, m, d, hh=0, mm=0, ss=0) -> int:
    return calendar.timegm((y, m, d, hh, mm, ss))


def write_csv(d: Path, rows, items=("1,Toy Story (1995),Animation", "2,\"Matrix, The (1999)\",Sci-Fi"),
              header="user_id,item_id,label,timestamp,split"):
    d.mkdir(parents=True, exist_ok=True)
    (d / "interactions.csv").write_text(header + "\n" + "".join(r + "\n" for r in rows))
    (d / "items.csv").write_text("item_id,title,description\n" + "".join(i + "\n" for i in items))
    return d


def test_csv_keeps_given_split_and_numeric_id_order(tmp_path):
    d = write_csv(tmp_path / "raw", ["10,1,1,100,test", "2,2,0,50,train", "2,1,1,60,valid", "10,2,0,90,train"])
    prep = prepare("csv", data_dir=d, out=tmp_path / "run", quiet=True)
    assert prep.users == ["2", "10"]  # numeric order, not "10" < "2"
    inter = load_prepared(tmp_path / "run").inter
    assert inter.split.tolist() == [0, 0, 1, 2]  # sorted by (split, user, time)
    assert inter.user.tolist() == [0, 1, 0, 1] and inter.label.tolist() == [0, 0, 1, 1]
    assert prep.items[1]["title"] == "Matrix, The (1999)" and prep.items[1]["description"] == "Sci-Fi"
    assert prep.stats["train"]["rows"] == 2 and prep.stats["users"] == 2 and prep.stats["noun"] == "item"


def test_csv_without_split_uses_time_order(tmp_path):
    rows = [f"{u},{1 + t % 2},{t % 2},{1000 - t},x" for t, u in enumerate([1] * 10)]
    d = write_csv(tmp_path, [r.rsplit(",", 1)[0] for r in rows], header="user_id,item_id,label,timestamp")
    inter = prepare("csv", data_dir=d, quiet=True).inter
    order = np.argsort(inter.timestamp, kind="stable")
    assert inter.split[order].tolist() == [0] * 8 + [1] + [2]


@pytest.mark.parametrize("rows,where,what", [
    (["1,1,1,100,train", "1,2,x,5,test"], "interactions.csv:3", "label"),
    (["1,1,1,100,train", "1,2,1,5"], "interactions.csv:3", "4 fields"),
    (["1,1,2,100,train"], "interactions.csv:2", "expected 0 or 1"),
    (["1,9,1,100,train"], "interactions.csv:2", "not in"),
    (["1,1,1,100,later"], "interactions.csv:2", "split"),
    (["1,1,1,1e,train"], "interactions.csv:2", "timestamp"),
])
def test_csv_malformed_lines_name_file_and_line(tmp_path, rows, where, what):
    d = write_csv(tmp_path / "raw", rows)
    with pytest.raises(DataError, match=what) as e:
        prepare("csv", data_dir=d, out=tmp_path / "run", quiet=True)
    assert where in str(e.value)
    assert not (tmp_path / "run" / "data").exists()  # nothing half-written


def test_missing_files_say_what_and_where(tmp_path):
    with pytest.raises(DataError) as e:
        prepare("csv", data_dir=tmp_path, quiet=True)
    assert "interactions.csv" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(DataError) as e:
        prepare("ml1m", data_dir=tmp_path, quiet=True)
    assert "ml-1m.zip" in str(e.value) and "https://files.grouplens.org" in str(e.value)
    for name, url in [("amazon-book", "nijianmo"), ("yelp", "yelp.com")]:
        with pytest.raises(DataError, match=url):
            prepare(name, data_dir=tmp_path, quiet=True)
    with pytest.raises(DataError, match="unknown dataset"):
        prepare("netflix", quiet=True)


def ml1m_files(d: Path, zipped: bool):
    times = [utc(2001, 5, 31, 23, 59, 59), utc(2001, 6, 1), utc(2002, 3, 31, 23, 59, 59), utc(2002, 4, 1),
             utc(2002, 8, 31, 23, 59, 59), utc(2002, 9, 1), utc(2003, 1, 31, 23, 59, 59), utc(2003, 2, 1)]
    ratings = "".join(f"{1 + k % 2}::{1 + k % 3}::{1 + k % 5}::{t}\n" for k, t in enumerate(times))
    movies = "1::Amélie (2001)::Comedy|Romance\n2::Heat (1995)::Action\n3::Alien (1979)::Horror|Sci-Fi\n"
    d.mkdir(parents=True, exist_ok=True)
    if zipped:
        with zipfile.ZipFile(d / "ml-1m.zip", "w") as z:
            z.writestr("ml-1m/ratings.dat", ratings.encode("latin-1"))
            z.writestr("ml-1m/movies.dat", movies.encode("latin-1"))
    else:
        (d / "ratings.dat").write_bytes(ratings.encode("latin-1"))
        (d / "movies.dat").write_bytes(movies.encode("latin-1"))


@pytest.mark.parametrize("zipped", [False, True])
def test_ml1m_month_boundaries_and_labels(tmp_path, zipped):
    ml1m_files(tmp_path, zipped)
    prep = prepare("ml1m", data_dir=tmp_path, quiet=True)
    inter = prep.inter
    order = np.argsort(inter.timestamp)
    # rows 1..6 survive (the first and last are outside 2001-06..2003-01), two per split
    assert inter.split[order].tolist() == [0, 0, 1, 1, 2, 2]
    assert inter.label[order].tolist() == [int(1 + k % 5 >= 4) for k in range(1, 7)]
    titles = {it["title"]: it["description"] for it in prep.items}
    assert titles["Amélie (2001)"] == "Comedy, Romance" and prep.stats["noun"] == "movie"


def test_ml1m_malformed_line(tmp_path):
    ml1m_files(tmp_path, False)
    with open(tmp_path / "ratings.dat", "a") as f:
        f.write("1::2::five::3\n")
    with pytest.raises(DataError, match=r"ratings.dat:9"):
        prepare("ml1m", data_dir=tmp_path, quiet=True)


@pytest.mark.skipif(not (SHARED / "interactions.csv").exists(), reason="shared ML-1M split not present")
def test_shared_ml1m_split_matches_paper_counts_and_month_rule(tmp_path):
    prep = prepare("csv", data_dir=SHARED, quiet=True)
    st = prep.stats
    assert [st[s]["rows"] for s in SPLITS] == [33891, 10401, 7331]
    assert (st["users"], st["items"]) == (838, 3255)
    keep, _, split = split_rules.ml1m(_as_raw(prep))
    assert keep.all() and np.array_equal(split, prep.inter.split)  # our month rule gives the release's split


def _as_raw(prep):
    from thinkrec.data.raw import RawLog
    i = prep.inter
    return RawLog(i.user.astype(str), i.item.astype(str), i.label * 5.0, i.timestamp, None, {})


def test_ml100k_atomic_and_grouplens_and_wheel(tmp_path, monkeypatch):
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{1 + k % 3}\t{1 + k % 2}\t{1 + k % 5}\t{1000 + (k // 2)}\n" for k in range(20))
    item = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n1\tToy Story\t1995\tAnimation Comedy\n2\tHeat\t1995\tAction\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ml-100k.inter").write_text(inter)
    (tmp_path / "a" / "ml-100k.item").write_text(item)
    a = prepare("ml100k", data_dir=tmp_path / "a", quiet=True)
    assert [a.stats[s]["rows"] for s in SPLITS] == [16, 2, 2]
    assert a.items[0]["title"] == "Toy Story (1995)" and a.items[0]["description"] == "Animation, Comedy"
    later = a.inter.split[np.argsort(a.inter.timestamp, kind="stable")]
    assert (np.diff(later) >= 0).all()  # global time order
    # the same data as a recbole wheel in the cache: no network needed
    monkeypatch.setenv("THINKREC_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    with zipfile.ZipFile(tmp_path / "cache" / "recbole-1.2.1-py3-none-any.whl", "w") as z:
        z.writestr("recbole/dataset_example/ml-100k/ml-100k.inter", inter)
        z.writestr("recbole/dataset_example/ml-100k/ml-100k.item", item)
    w = prepare("ml100k", quiet=True)
    assert np.array_equal(w.inter.label, a.inter.label) and np.array_equal(w.inter.split, a.inter.split)
    # GroupLens u.data / u.item
    g = tmp_path / "g"
    g.mkdir()
    (g / "u.data").write_text("".join(f"{1 + k % 3}\t{1 + k % 2}\t{1 + k % 5}\t{1000 + (k // 2)}\n" for k in range(20)))
    flags = lambda on: "|".join("1" if i in on else "0" for i in range(19))
    (g / "u.item").write_bytes(f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags({3, 5})}\n"
                               f"2|Heat (1995)|01-Jan-1995||http://y|{flags({1})}\n".encode("latin-1"))
    gl = prepare("ml100k", data_dir=g, quiet=True)
    assert gl.items[0]["description"] == "Animation, Comedy" and np.array_equal(gl.inter.split, a.inter.split)


def _big_log(start_year, n_users=22, n_items=22):
    """A full user x item grid (each has 22 > 20 ratings), times spread over the given year and the next."""
    rows = []
    for u in range(n_users):
        for i in range(n_items):
            k = u * n_items + i
            rows.append((f"U{u}", f"I{i}", 1 + k % 5, k))
    return rows


def test_amazon_year_filter_labels_and_halves(tmp_path):
    reviews = []
    for u, i, r, k in _big_log(2017):
        month = 1 + k % 12
        reviews.append({"reviewerID": u, "asin": i, "overall": float(r), "unixReviewTime": utc(2017, month, 1 + k % 28)})
    reviews += [{"reviewerID": "SPARSE", "asin": f"I{i}", "overall": 5.0, "unixReviewTime": utc(2017, 3, 1)}
                for i in range(20)]  # exactly 20 ratings: not > 20, dropped
    reviews.append({"reviewerID": "U0", "asin": "I1", "overall": 5.0, "unixReviewTime": utc(2016, 12, 31, 23, 59, 59)})
    with gzip.open(tmp_path / "Books.json.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in reviews))
    with gzip.open(tmp_path / "meta_Books.json.gz", "wt") as f:
        f.write("".join(json.dumps({"asin": f"I{i}", "title": f"Book {i}", "category": ["Books", "Mystery"],
                                    "description": ["A tale."]}) + "\n" for i in range(22)))
    prep = prepare("amazon-book", data_dir=tmp_path, quiet=True)
    inter, st = prep.inter, prep.stats
    assert st["users"] == 22 and st["rows"] == 484
    month = inter.timestamp.astype("datetime64[s]").astype("datetime64[M]").astype(int) % 12 + 1
    assert (inter.split[month <= 10] == 0).all() and (inter.split[month > 10] > 0).all()
    late = np.flatnonzero(month > 10)
    late = late[np.argsort(inter.timestamp[late], kind="stable")]
    assert st["valid"]["rows"] == len(late) // 2 and inter.timestamp[late][: len(late) // 2].max() <= inter.timestamp[inter.split == 2].min()
    raw = np.array([r for _, _, r, _ in _big_log(2017)])
    assert inter.label.sum() == (raw == 5).sum()
    assert prep.items[0]["description"] == "Mystery" and prep.stats["noun"] == "book"


def test_amazon_malformed_json_line(tmp_path):
    with gzip.open(tmp_path / "Books.json.gz", "wt") as f:
        f.write('{"reviewerID": "a", "asin": "b", "overall": 5, "unixReviewTime": 1}\n{"reviewerID": \n')
    with gzip.open(tmp_path / "meta_Books.json.gz", "wt") as f:
        f.write('{"asin": "b", "title": "t"}\n')
    with pytest.raises(DataError, match=r"Books.json.gz:2: invalid JSON"):
        prepare("amazon-book", data_dir=tmp_path, quiet=True)


def test_yelp_years_train_and_halves(tmp_path):
    reviews = []
    for u, i, r, k in _big_log(2010):
        year = 2010 + k % 13
        reviews.append({"user_id": u, "business_id": i, "stars": r, "date": f"{year}-0{1 + k % 9}-1{k % 10} 12:00:00"})
    reviews.append({"user_id": "U0", "business_id": "I0", "stars": 5, "date": "2009-12-31 23:59:59"})
    (tmp_path / "review.json").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    (tmp_path / "business.json").write_text("".join(
        json.dumps({"business_id": f"I{i}", "name": f"Cafe {i}", "categories": "Food, Coffee & Tea"}) + "\n" for i in range(22)))
    prep = prepare("yelp", data_dir=tmp_path, quiet=True)
    inter = prep.inter
    years = inter.timestamp.astype("datetime64[s]").astype("datetime64[Y]").astype(int) + 1970
    assert len(inter) == 484 and years.min() == 2010
    assert (inter.split[years <= 2019] == 0).all() and (inter.split[years >= 2020] > 0).all()
    n_late = (years >= 2020).sum()
    assert prep.stats["valid"]["rows"] == n_late // 2 and prep.stats["test"]["rows"] == n_late - n_late // 2
    stars = np.array([r for _, _, r, _ in _big_log(2010)])
    assert inter.label.sum() == (stars >= 4).sum()
    assert prep.items[0]["title"] == "Cafe 0" and prep.items[0]["description"] == "Food, Coffee & Tea"
    with open(tmp_path / "review.json", "a") as f:
        f.write(json.dumps({"user_id": "U1", "business_id": "I1", "stars": 4, "date": "yesterday"}) + "\n")
    with pytest.raises(DataError, match=r"review.json:486: date"):
        prepare("yelp", data_dir=tmp_path, quiet=True)


class _FakeResponse:
    def __init__(self, data):
        self.data = data

    def read(self):
        return self.data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_ml1m_download_checks_md5_and_reports_failures(tmp_path, monkeypatch):
    import urllib.request
    monkeypatch.setenv("THINKREC_CACHE", str(tmp_path))

    def offline(url, timeout=None):
        raise OSError("network unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=r"ml-1m.zip failed .*network unreachable.*save it as"):
        prepare("ml1m", quiet=True)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(b"not the zip"))
    with pytest.raises(DataError, match="md5"):
        prepare("ml1m", quiet=True)
    assert not (tmp_path / "ml-1m.zip").exists()  # a bad download is never kept
    # a cached zip is read without the network, but its checksum is still verified
    (tmp_path / "ml-1m.zip").write_bytes(b"corrupt")
    with pytest.raises(DataError, match="delete it and download again"):
        prepare("ml1m", quiet=True)


def test_jsonl_reader_chunks_blank_lines_and_line_numbers(tmp_path):
    from thinkrec.data.sources._read import jsonl_columns, read_jsonl
    path = tmp_path / "x.json"
    lines = [json.dumps({"a": k, "b": str(k)}) if k % 4 else "   " for k in range(11)]
    path.write_text("\n".join(lines) + "\n")
    numbers, (a, _) = jsonl_columns(path, ("a", "b"))
    assert list(numbers) == [k + 1 for k in range(11) if k % 4] and a == [k for k in range(11) if k % 4]
    got = [(n, o["a"]) for n, o in read_jsonl(path)]
    assert got == [(k + 1, k) for k in range(11) if k % 4]
    path.write_text(json.dumps({"a": 1, "b": "x"}) + "\n" + json.dumps({"a": 2}) + "\n")
    with pytest.raises(DataError, match=r"x.json:2: missing field\(s\) \['b'\]"):
        jsonl_columns(path, ("a", "b"))
    path.write_text('{"a": 1, "b": 2}, {"a": 3, "b": 4}\n{"a": 5, "b": 6}\n')  # two objects on one line
    with pytest.raises(DataError, match=r"x.json:1: invalid JSON"):
        jsonl_columns(path, ("a", "b"))


def test_cli_prepare_and_prompt(tmp_path, capsys):
    from thinkrec.data.__main__ import main
    d = write_csv(tmp_path / "raw", ["1,1,1,100,train", "1,2,0,200,valid", "1,1,1,300,test"])
    assert main(["prepare", "--dataset", "csv", "--data-dir", str(d), "--run-dir", str(tmp_path / "run"),
                 "--noun", "movie"]) == 0
    assert "| csv | 1 | 1 | 1 | 1 | 2 |" in capsys.readouterr().out
    assert main(["prompt", "--run-dir", str(tmp_path / "run"), "--split", "test", "--row", "0", "--mode", "text"]) == 0
    out = capsys.readouterr().out
    assert out.startswith('#Question: A user has given ratings to the following movies: "Toy Story (1995)" '
                          '(evaluation: Yes) with description: Animation; "Matrix, The (1999)" (evaluation: No) '
                          'with description: Sci-Fi. Leverage')
    assert out.rstrip().endswith("#Answer: Yes")
    assert main(["prompt", "--run-dir", str(tmp_path / "run"), "--split", "test", "--row", "5"]) == 2
    assert "has 1 rows" in capsys.readouterr().err


def test_cli_prompt_history_rule_on_a_same_second_tie(tmp_path, capsys):
    """Two rows of the same second: the second one's prompt shows the first only under --history file."""
    from thinkrec.data.__main__ import main
    d = write_csv(tmp_path / "raw", ["1,1,1,100,train", "1,2,0,200,valid", "1,1,1,200,test"])
    assert main(["prepare", "--dataset", "csv", "--data-dir", str(d), "--run-dir", str(tmp_path / "run"),
                 "--noun", "movie"]) == 0
    capsys.readouterr()
    run = ["prompt", "--run-dir", str(tmp_path / "run"), "--split", "test", "--row", "0", "--mode", "text"]
    assert main(run) == 0
    strict = capsys.readouterr().out
    assert main(run + ["--history", "file"]) == 0
    official = capsys.readouterr().out
    assert '"Matrix, The (1999)" (evaluation: No)' in official and "Matrix" not in strict.split("Leverage")[0]
    assert main(run + ["--history", "file", "--titles", "no-year"]) == 0  # the official code's ML-1M titles
    assert capsys.readouterr().out == official.replace(" (1999)", "").replace(" (1995)", "")


def test_with_titles_strips_the_year_as_the_official_code():
    from thinkrec.data.prepared import Prepared
    from thinkrec.data.prompts import with_titles

    items = [{"item": 0, "raw_id": "1", "title": "Shining, The (1980)"}, {"item": 1, "raw_id": "2", "title": "Se7en"},
             {"item": 2, "raw_id": "3", "title": "Apollo 13 (1995)"}]
    prep = Prepared(None, [], items, {})
    out = with_titles(prep, "no-year")
    assert [it["title"] for it in out.items] == ["Shining, The", "Se7en", "Apollo 13"]
    assert prep.items[0]["title"] == "Shining, The (1980)" and with_titles(prep, "full") is prep
    with pytest.raises(ValueError, match="title style"):
        with_titles(prep, "short")
