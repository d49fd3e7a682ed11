"""Item keywords (C.1): reply parsing, item profiles, the TF-IDF and genre fallbacks, the resumable teacher run."""

import json
import sys
import threading
import types
from types import SimpleNamespace

import pytest
import sklearn.feature_extraction.text  # noqa: F401  scikit-learn's first import (~2 s) at collection, not in a test

from thinkrec.data.prompts import MAX_KEYWORDS, load_keywords
from thinkrec.reasoning import keywords as kw
from thinkrec.reasoning.teacher import TeacherError

REAL_DEFAULT_STOPWORDS = kw.default_stopwords


@pytest.fixture(autouse=True)
def builtin_stopwords(monkeypatch):
    """Expected keywords do not depend on whether nltk's corpus is installed on this machine."""
    monkeypatch.setattr(kw, "default_stopwords", lambda: kw.BUILTIN_STOPWORDS)


# ------------------------------------------------------------------------------------------ parsing
MESSY = """Sure! Here are the keywords. Keywords: magic, dragons
KEYWORDS:
1. Epic Fantasy
2. "Dragons"
3. the 3rd Age; quests, QUESTS, a long phrase that has far too many words in it, war of 1812, first love
- 'Magic'
* **Children's Books**"""


@pytest.mark.parametrize("text, expected", [
    (MESSY, ["epic fantasy", "dragons", "age", "quests", "war", "love", "magic", "children's books"]),
    ("- Mystery\n- Detective Fiction\n* Crime", ["mystery", "detective fiction", "crime"]),  # no "Keywords:"
    ("Genre: Thriller, Setting: London", ["genre thriller", "setting london"]),  # colons dropped
    ("keywords : “Space Opera”, 19th century, twelfth night, 2nd edition, 1990s", ["space opera", "century",
                                                                                 "night", "edition"]),
    ("Keywords: sci fi, AI, ux design, an, of the", ["sci", "design"]),  # words under 3 characters go
    ("Keywords: alpha beta gamma delta, alpha beta gamma delta epsilon, the alpha of beta and gamma or delta",
     ["alpha beta gamma delta"]),  # over 4 words after cleaning: a sentence; the third repeats the first
    ("", []),
    ("Keywords:", []),
    ("1, 2, 3, the, of", []),
    ("<think>Keywords: wrong</think>Keywords: right", ["right"]),
])
def test_parse_keywords(text, expected):
    got = kw.parse_keywords(text)
    assert got == expected, f"parse_keywords({text!r}):\n got      {got}\n expected {expected}"


def test_parse_keywords_limit_and_determinism():
    words = [f"word{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    text = "Keywords: " + ", ".join(w.title() for w in words)
    first = kw.parse_keywords(text)
    assert first == words[:MAX_KEYWORDS] == kw.parse_keywords(text)
    assert kw.parse_keywords(text, limit=3) == words[:3]
    assert kw.parse_keywords("b, a, c, a, b") == []  # all under 3 characters
    assert kw.parse_keywords("beta, alpha, gamma, alpha, beta") == ["beta", "alpha", "gamma"]  # first-seen order


def test_parse_keywords_custom_stopwords():
    assert kw.parse_keywords("fantasy novel, magic", stopwords=frozenset({"novel"})) == ["fantasy", "magic"]


def test_default_stopwords_nltk_or_builtin(monkeypatch):
    """nltk's list when its corpus loads; the built-in list when the corpus is missing (LookupError)."""
    def fake_nltk(words):
        def load(lang):
            assert lang == "english"
            if words is None:
                raise LookupError("Resource stopwords not found.")
            return words
        corpus = types.ModuleType("nltk.corpus")
        corpus.stopwords = SimpleNamespace(words=load)
        monkeypatch.setitem(sys.modules, "nltk", types.ModuleType("nltk"))
        monkeypatch.setitem(sys.modules, "nltk.corpus", corpus)

    try:
        fake_nltk(["The", "zebra"])
        REAL_DEFAULT_STOPWORDS.cache_clear()
        assert REAL_DEFAULT_STOPWORDS() == frozenset({"the", "zebra"})
        fake_nltk(None)
        REAL_DEFAULT_STOPWORDS.cache_clear()
        assert REAL_DEFAULT_STOPWORDS() is kw.BUILTIN_STOPWORDS
    finally:
        REAL_DEFAULT_STOPWORDS.cache_clear()
    assert 140 <= len(kw.BUILTIN_STOPWORDS) <= 220 and {"the", "and", "of", "which"} <= kw.BUILTIN_STOPWORDS


# ------------------------------------------------------------------------------------------ profile
def test_item_profile_order_cut_and_no_title():
    item = {"item": 0, "raw_id": "b1", "title": "Secret Title", "text": " ".join(f"w{i}" for i in range(150)),
            "address": "1 Main St,  Springfield", "description": "Fantasy, Epic"}
    lines = kw.item_profile(item).split("\n")
    assert [ln.split(":")[0] for ln in lines] == ["Category", "Address", "Description"]
    assert lines[0] == "Category: Fantasy, Epic" and lines[1] == "Address: 1 Main St, Springfield"
    assert lines[2] == "Description: " + " ".join(f"w{i}" for i in range(100))
    assert "Secret" not in kw.item_profile(item)
    assert kw.item_profile(item, max_words=2).split("\n") == ["Category: Fantasy, Epic", "Address: 1 Main",
                                                              "Description: w0 w1"]
    # explicit categories (a list) win over the description; missing fields are left out
    assert kw.item_profile({"title": "T", "categories": ["Books", "Poetry"], "description": "x"}) == \
        "Category: Books, Poetry"
    assert kw.item_profile({"item": 1, "raw_id": "b2", "title": "Only a title", "description": ""}) == ""


def test_keyword_prompt_is_c1():
    text = kw.keyword_prompt("Category: Fantasy", "book")
    assert text == ("Category: Fantasy\n\nYour task is to extract up to ten keywords from the given profile of the "
                    "book above. Answers should contain only keywords, which should be separated by commas.\n\n"
                    "Keywords:")


# --------------------------------------------------------------------------------- teacher-free
def test_tfidf_keywords():
    items = [{"item": 0, "raw_id": "a", "title": "Zzz", "description": "dragons magic dragons quest"},
             {"item": 1, "raw_id": "b", "title": "Zzz", "description": "The romance in Paris, love 2001 ai"},
             {"item": 2, "raw_id": "c", "title": "Zzz", "description": "dragons space"},
             {"item": 3, "raw_id": "d", "title": "Zzz", "description": ""}]
    got = kw.tfidf_keywords(items, limit=3)
    # idf = ln(4 / (1 + df)) + 1: "dragons" (df 2, tf 2 in item 0) 2.58 beats the rest (1.69 each), and equal
    # weights go alphabetically; "the"/"in" are stopwords, "2001" and "ai" no tokens; titles and labels unused
    assert got == {0: ["dragons", "dragons magic", "dragons quest"], 1: ["love", "paris", "paris love"],
                   2: ["dragons space", "space", "dragons"], 3: []}
    assert len(kw.tfidf_keywords(items)[1]) == 5  # love, paris, paris love, romance, romance paris
    assert kw.tfidf_keywords([{"item": 0, "raw_id": "a", "title": "T", "description": "the of"}]) == {0: []}


def test_genre_keywords():
    items = [{"item": 0, "description": "Action|Comedy"}, {"item": 1, "description": "Drama, Romance"},
             {"item": 2, "description": ""}, {"item": 3, "description": "Action, Action ,War|"}]
    assert kw.genre_keywords(items) == {0: ["Action", "Comedy"], 1: ["Drama", "Romance"], 2: [],
                                        3: ["Action", "War"]}


# ------------------------------------------------------------------------------------ teacher run
class StubTeacher:
    """Answers "Keywords: <first profile word>, Wizards"; raises TeacherError for profiles in `fail`, answers
    nothing for "Thinking"."""

    name = "stub"

    def __init__(self, fail=()):
        self.fail, self.calls, self._lock = set(fail), [], threading.Lock()

    def chat(self, messages, max_tokens):
        content = messages[0]["content"]
        with self._lock:
            self.calls.append((messages, max_tokens))
        first = content.split(": ", 1)[1].split()[0]
        if first in self.fail:
            raise TeacherError(f"HTTP 500: server down for {first}", retries=6)
        if first == "Thinking":  # a reasoning model that ran out of tokens before answering
            return SimpleNamespace(content="", reasoning="Let me think", usage={})
        return SimpleNamespace(content=f"Keywords: {first}, Wizards", reasoning="", usage={"prompt_tokens": 9})


ITEMS = [{"item": 0, "raw_id": "a", "title": "A", "description": "Fantasy"},
         {"item": 1, "raw_id": "b", "title": "B", "description": "Failing"},
         {"item": 2, "raw_id": "c", "title": "C", "description": ""},
         {"item": 3, "raw_id": "d", "title": "D", "description": "", "text": "Space opera"},
         {"item": 4, "raw_id": "e", "title": "E", "description": "Mystery"}]


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_extract_keywords_failure_then_resume_after_kill(tmp_path):
    out = tmp_path / "kw.jsonl"
    teacher, logged = StubTeacher(fail={"Failing"}), []
    s1 = kw.extract_keywords(ITEMS, teacher, "book", out, concurrency=3, progress=False, log=logged.append)
    assert {k: s1[k] for k in ("items", "done_before", "written", "failed", "empty", "teacher")} == \
        {"items": 5, "done_before": 0, "written": 4, "failed": 1, "empty": 1, "teacher": "stub"}
    assert len(logged) == 1 and "1 failed" in logged[0]
    assert len(teacher.calls) == 4  # not for the item without metadata
    messages, max_tokens = next(c for c in teacher.calls if "Space" in c[0][0]["content"])
    assert max_tokens == 64 and messages == [{"role": "user", "content": kw.keyword_prompt("Description: Space opera",
                                                                                          "book")}]
    rows = {r["item_id"]: r for r in read_lines(out)}
    assert set(rows) == {"a", "c", "d", "e"}
    assert rows["a"] == {"item_id": "a", "keywords": ["fantasy", "wizards"], "teacher": "stub"}
    assert rows["c"]["keywords"] == [] and rows["d"]["keywords"] == ["space", "wizards"]
    fails = read_lines(tmp_path / "kw.failures.jsonl")
    assert fails == [{"item_id": "b", "error": "HTTP 500: server down for Failing"}]

    # a kill: two lines whole, the third cut mid-line, the fourth never written
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1] + lines[2][:9])
    kept = {json.loads(ln)["item_id"] for ln in lines[:2]}
    teacher2 = StubTeacher()
    s2 = kw.extract_keywords(ITEMS, teacher2, "book", out, concurrency=2, progress=False, log=lambda *_: None)
    assert s2["done_before"] == 2 and s2["written"] == 3 and s2["failed"] == 0
    asked = {c[0][0]["content"].split(": ", 1)[1].split()[0] for c in teacher2.calls}
    redo = {"a": "Fantasy", "b": "Failing", "d": "Space", "e": "Mystery"}
    assert asked == {redo[i] for i in set(redo) - kept}  # done items skipped, the failed one asked again
    final = read_lines(out)  # every line whole JSON: the partial line was cut
    assert sorted(r["item_id"] for r in final) == ["a", "b", "c", "d", "e"]  # none lost, none twice
    assert next(r for r in final if r["item_id"] == "b")["keywords"] == ["failing", "wizards"]
    assert len(read_lines(tmp_path / "kw.failures.jsonl")) == 1  # appended to; nothing failed this time

    by_index = load_keywords(out, ITEMS)
    assert by_index == {0: ["fantasy", "wizards"], 1: ["failing", "wizards"], 2: [], 3: ["space", "wizards"],
                        4: ["mystery", "wizards"]}
    s3 = kw.extract_keywords(ITEMS, StubTeacher(), "book", out, progress=False, log=lambda *_: None)
    assert s3["done_before"] == 5 and s3["written"] == 0 and read_lines(out) == final


def test_keywords_main_genres_and_tfidf(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "items.csv").write_text('item_id,title,description\n1,"Heat (1995)","Action, Crime"\n'
                                    '2,"Toy Story (1995)","Animation, Children\'s, Comedy"\n3,"Blank",\n')
    rows = [(u, i, (u + i) % 2, 100 * u + 10 * i) for u in (1, 2, 3) for i in (1, 2, 3)]
    (data / "interactions.csv").write_text("user_id,item_id,label,timestamp\n" +
                                           "".join(f"{u},{i},{lab},{t}\n" for u, i, lab, t in rows))
    out = tmp_path / "kw.jsonl"
    summary = kw.keywords_main(["--dataset", "csv", "--data-dir", str(data), "--teacher", "genres", "--out", str(out)])
    assert summary["items"] == 3 and summary["written"] == 3 and summary["empty"] == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert read_lines(out) == [{"item_id": "1", "keywords": ["Action", "Crime"], "teacher": "genres"},
                               {"item_id": "2", "keywords": ["Animation", "Children's", "Comedy"], "teacher": "genres"},
                               {"item_id": "3", "keywords": [], "teacher": "genres"}]
    kw.keywords_main(["--dataset", "csv", "--data-dir", str(data), "--teacher", "tfidf", "--out", str(out)])
    assert read_lines(out)[0] == {"item_id": "1", "keywords": ["action", "action crime", "crime"], "teacher": "tfidf"}


def test_extract_keywords_empty_reply_is_a_failure(tmp_path):
    """A reply without keywords is not written as done (it would hide a teacher that never answered)."""
    out = tmp_path / "kw.jsonl"
    items = [{"item": 0, "raw_id": "x", "title": "X", "description": "Thinking"}]
    s = kw.extract_keywords(items, StubTeacher(), "movie", out, progress=False, log=lambda *_: None)
    assert s["written"] == 0 and s["failed"] == 1
    assert not out.exists() or read_lines(out) == []
    (fail,) = read_lines(tmp_path / "kw.failures.jsonl")
    assert fail["item_id"] == "x" and "no keywords in the reply ''" in fail["error"] and "--max-tokens" in fail["error"]
