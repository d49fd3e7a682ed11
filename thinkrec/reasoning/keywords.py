"""Item keywords (paper appendix C.1): up to 10 per item from its metadata, for the prompts' descriptions.

    python -m thinkrec.reasoning keywords --run-dir runs/amazon-book --teacher http://localhost:8000/v1 --teacher-model M
    python -m thinkrec.reasoning keywords --dataset csv --data-dir ../shared/data/ml1m-collm --teacher genres \\
        --out /tmp/ml1m-keywords.jsonl

Output: JSON Lines {"item_id": raw id, "keywords": [str], "teacher": name}, default RUN/data/keywords.jsonl,
which train.py and `thinkrec.data.prompts.load_keywords` read (first 10 keywords of each item).

Profile (the teacher's input; the title is left out, as in the official code): one line per field present,
in this order, each field cut to 100 words:

    Category: <item["categories"], else item["description"]>   the data layer's "description" holds the
                                                               source's categories / genres
    Address: <item["address"]>                                  no source keeps one today
    Description: <item["text"]>                                 Amazon's long description

followed by "\\n\\n" and the C.1 instruction with the dataset's noun. An item without metadata gets [] and
no request.

Teachers (--teacher): an OpenAI-compatible URL or local[:MODEL] (the C.1 prompt through
`thinkrec.reasoning.teacher`; resumable: a rerun skips items already written, repairs a line cut by a kill
and asks again for items whose request failed), `tfidf` (offline: top TF-IDF terms of the profile) or
`genres` (ML-1M style: the genres themselves, as the official code does for MovieLens).
"""

import argparse
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import cache
from pathlib import Path

from tqdm.auto import tqdm

from thinkrec.data.prompts import MAX_KEYWORDS
from thinkrec.errors import number
from thinkrec.io import AppendLog, to_json, write_jsonl
from thinkrec.rundir import RunDir

from .files import failures_path, load_data
from .teacher import TeacherError, make_teacher

C1_PROMPT = ("Your task is to extract up to ten keywords from the given profile of the {noun} above. Answers should "
             "contain only keywords, which should be separated by commas.\n\nKeywords:")
PROFILE_WORDS = 100  # words kept per metadata field (official code)
MAX_PHRASE_WORDS = 4  # a longer "keyword" is a sentence, not a keyword
MIN_WORD_CHARS = 3

# A compact English stopword list, used when nltk's corpus is not installed (it needs a download). The
# official code used a 926-word list; this one holds the function words of nltk's list without contractions.
BUILTIN_STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between
both but by can could did do does doing down during each either else etc ever every few for from further get
gets got had has have having he her here hers herself him himself his how however i if in into is it its itself
just let like may me might more most much must my myself neither no nor not now of off often on once one only
or other others ought our ours ourselves out over own per quite rather same shall she should since so some such
than that the their theirs them themselves then there these they this those though through thus to too under
until up upon us very via was we well were what whatever when where whether which while who whom whose why will
with within without would yet you your yours yourself yourselves
""".split())
ORDINAL_WORDS = frozenset("first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth".split())
_ORDINAL = re.compile(r"^\d+(?:st|nd|rd|th)$")
_LIST_MARKER = re.compile(r"^\s*(?:\(?\d+[.):]|[-*•+]+)\s+")
_SPLIT = re.compile(r"[,;\n\r]+")
_NOT_WORD = re.compile(r"[^\w\s'-]|_")
_QUOTES = re.compile(r"[\"`“”„«»]")
_KEYWORDS = re.compile(r"keywords\s*:", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------ profile
def _field_text(value, max_words: int) -> str:
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value if v)
    return " ".join(str(value or "").split()[:max_words])


def profile_fields(item: dict, max_words: int = PROFILE_WORDS) -> list:
    """[(label, text)] of the item's non-empty metadata fields in the fixed order (see the module docstring)."""
    fields = (("Category", item.get("categories") or item.get("description")),
              ("Address", item.get("address")),
              ("Description", item.get("text")))
    out = [(label, _field_text(value, max_words)) for label, value in fields]
    return [(label, text) for label, text in out if text]


def item_profile(item: dict, max_words: int = PROFILE_WORDS) -> str:
    """"Category: ...\\nAddress: ...\\nDescription: ..." (fields present only); "" without metadata."""
    return "\n".join(f"{label}: {text}" for label, text in profile_fields(item, max_words))


def keyword_prompt(profile: str, noun: str) -> str:
    return profile + "\n\n" + C1_PROMPT.format(noun=noun)


# ------------------------------------------------------------------------------------------------ parsing
@cache
def default_stopwords() -> frozenset:
    """nltk's English stopwords when its corpus is installed, else BUILTIN_STOPWORDS."""
    try:
        from nltk.corpus import stopwords

        return frozenset(w.lower() for w in stopwords.words("english"))
    except (ImportError, LookupError, OSError):  # no nltk, or its corpus was never downloaded
        return BUILTIN_STOPWORDS


def _clean_phrase(phrase: str, stopwords: frozenset) -> str:
    """Lowercase; digits, ordinals, stopwords and words under 3 characters removed; "" if nothing is left."""
    words = []
    for word in _NOT_WORD.sub(" ", phrase.lower().replace("’", "'")).split():
        word = word.strip("'-")
        if _ORDINAL.match(word) or word in ORDINAL_WORDS:
            continue
        word = re.sub(r"\d+", "", word).strip("'-")
        if len(word) >= MIN_WORD_CHARS and word not in stopwords:
            words.append(word)
    return " ".join(words)


def parse_keywords(text: str, limit: int = MAX_KEYWORDS, stopwords: frozenset | None = None) -> list:
    """Keywords of a teacher's reply: the text after the last "Keywords:" (all of it if absent), split on
    commas, semicolons and newlines, list markers and quotes dropped, each phrase cleaned (`_clean_phrase`),
    phrases over 4 words dropped, duplicates dropped keeping the first, the first `limit`.

    `stopwords`: default nltk's English list if installed, else BUILTIN_STOPWORDS.
    """
    stopwords = default_stopwords() if stopwords is None else stopwords
    text = text.rsplit("</think>", 1)[-1]  # a reasoning model's thoughts left in the content
    marks = list(_KEYWORDS.finditer(text))
    if marks:
        text = text[marks[-1].end():]
    text = _QUOTES.sub("", text).replace(":", " ")
    out, seen = [], set()
    for piece in _SPLIT.split(text):
        phrase = _clean_phrase(_LIST_MARKER.sub("", piece), stopwords)
        if phrase and len(phrase.split()) <= MAX_PHRASE_WORDS and phrase not in seen:
            seen.add(phrase)
            out.append(phrase)
    return out[:limit]


# -------------------------------------------------------------------------------------- teacher-free
def genre_keywords(items: list) -> dict:
    """{item index: genres}: the description split on "," or "|" (ML-1M's genres are its keywords)."""
    out = {}
    for it in items:
        words = [w.strip() for w in str(it.get("description") or "").replace("|", ",").split(",")]
        out[it["item"]] = list(dict.fromkeys(w for w in words if w))[:MAX_KEYWORDS]
    return out


def tfidf_keywords(items: list, limit: int = MAX_KEYWORDS) -> dict:
    """{item index: top `limit` TF-IDF terms of its profile values}, ties broken alphabetically.

    Unigrams and bigrams of letter-only words of 3+ characters, scikit-learn's English stopwords, the idf
    fitted over the items with text; an item without text gets [].
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = {it["item"]: " \n ".join(t for _, t in profile_fields(it)) for it in items}
    have = [i for i, t in texts.items() if t]
    out = {i: [] for i in texts}
    if not have:
        return out
    vec = TfidfVectorizer(stop_words="english", ngram_range=(1, 2), token_pattern=r"(?u)\b[^\W\d_]{3,}\b")
    try:
        weights = vec.fit_transform([texts[i] for i in have]).tocsr()  # [n_items_with_text, n_terms]
    except ValueError:  # every word is a stopword or shorter than 3 letters: no vocabulary
        return out
    terms = vec.get_feature_names_out()
    for row, i in enumerate(have):
        lo, hi = weights.indptr[row], weights.indptr[row + 1]
        scored = sorted(zip(-weights.data[lo:hi], terms[weights.indices[lo:hi]]))
        out[i] = [str(t) for _, t in scored[:limit]]
    return out


# ------------------------------------------------------------------------------------------ teacher
class NoKeywords(Exception):
    """A reply with no keyword in it (e.g. a reasoning model that spent `max_tokens` thinking)."""


def _ask(teacher, prompt: str, max_tokens: int) -> list:
    reply = teacher.chat([{"role": "user", "content": prompt}], max_tokens)
    words = parse_keywords(reply.content)
    if not words:
        raise NoKeywords(f"no keywords in the reply {reply.content[:200]!r} (a reasoning teacher may need a "
                         f"larger --max-tokens than {max_tokens})")
    return words


def extract_keywords(items: list, teacher, noun: str, out_path, *, concurrency: int = 16, max_tokens: int = 64,
                     progress: bool = True, log=print) -> dict:
    """Ask `teacher` for each item's keywords (C.1) and append one line per finished item to `out_path`.

    Resumable: items already in the file are skipped, a last line cut by a kill is dropped first. A request
    that fails after the teacher's retries (TeacherError), or whose reply holds no keyword, goes to
    `<out>.failures.jsonl` ({"item_id", "error"}, appended) and is asked again by the next run. Items
    without metadata are written with [] unasked.
    Returns {"items", "done_before", "written" (lines this run, empty ones included), "failed", "empty",
    "seconds", "teacher"}.
    """
    start = time.perf_counter()
    out, failures = AppendLog(out_path, "delete it to extract the keywords again"), AppendLog(failures_path(out_path))
    done = {str(r.get("item_id")) for r in out.read() if isinstance(r, dict)}
    todo = [it for it in items if str(it["raw_id"]) not in done]
    prompts = {it["raw_id"]: item_profile(it) for it in todo}
    written = failed = empty = 0
    for it in todo:
        if not prompts[it["raw_id"]]:
            out.append({"item_id": it["raw_id"], "keywords": [], "teacher": teacher.name})
            written, empty = written + 1, empty + 1
    asked = [raw for raw, profile in prompts.items() if profile]
    bar = tqdm(total=len(asked), unit="items", desc="keywords", disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = {pool.submit(_ask, teacher, keyword_prompt(prompts[raw], noun), max_tokens): raw for raw in asked}
        for fut in as_completed(futures):
            raw = futures[fut]
            try:
                out.append({"item_id": raw, "keywords": fut.result(), "teacher": teacher.name})
                written += 1
            except (TeacherError, NoKeywords) as e:
                failures.append({"item_id": raw, "error": str(e)})
                failed += 1
            bar.update(1)
            bar.set_postfix(failed=failed, refresh=False)
    finally:  # on Ctrl-C: drop the requests not started; what finished is on disk
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    summary = {"items": len(items), "done_before": len(items) - len(todo), "written": written, "failed": failed,
               "empty": empty, "seconds": round(time.perf_counter() - start, 3), "teacher": teacher.name}
    log(f"keywords: {written} items written ({empty} without metadata), {failed} failed"
        f"{f' (see {failures.path}; a rerun asks again)' if failed else ''}, {summary['done_before']} done before; "
        f"{len(items)} items, {summary['seconds']:.1f}s, teacher {teacher.name} -> {out_path}")
    return summary


def write_keywords(items: list, keywords: dict, name: str, out_path) -> dict:
    """Write a whole keyword file atomically ({item index: [str]} from genre_keywords / tfidf_keywords)."""
    start = time.perf_counter()
    write_jsonl(out_path, ({"item_id": it["raw_id"], "keywords": keywords.get(it["item"], []), "teacher": name}
                           for it in items))
    empty = sum(not keywords.get(it["item"]) for it in items)
    return {"items": len(items), "done_before": 0, "written": len(items), "failed": 0, "empty": empty,
            "seconds": round(time.perf_counter() - start, 3), "teacher": name}


# ---------------------------------------------------------------------------------------------- CLI
def keywords_main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m thinkrec.reasoning keywords", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    p.add_argument("--dataset", default=None, help="ml1m | ml100k | amazon-book | yelp | csv (not needed "
                   "with --run-dir holding prepared data)")
    p.add_argument("--data-dir", default=None, help="where the raw files are")
    p.add_argument("--run-dir", dest="run", default=None, help="run directory: its prepared data is read (prepared there "
                   "first when missing); the default output is RUN/data/keywords.jsonl. Default runs/<dataset> "
                   "unless --out is given (then the data is prepared in memory)")
    p.add_argument("--noun", default=None, help="noun in the C.1 prompt (default: the prepared data's: "
                   "movie / book / business; csv: item)")
    # Teacher
    p.add_argument("--teacher", required=True, help="an OpenAI-compatible base URL, local[:MODEL], tfidf "
                   "(offline TF-IDF terms) or genres (the item's genres/categories)")
    p.add_argument("--teacher-model", dest="model", default=None, help="model name the server serves (HTTP teachers)")
    p.add_argument("--concurrency", type=number(int, 1), default=16, help="requests in flight")
    p.add_argument("--max-tokens", type=number(int, 1), default=64, help="tokens per reply")
    # Output
    p.add_argument("--out", default=None, help="keyword file (default RUN/data/keywords.jsonl)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.out is None and a.run is None:
        if a.dataset is None:
            p.error("give --dataset, --run-dir RUN or --out PATH")
        a.run = f"runs/{a.dataset}"  # as train.py
    if a.concurrency < 1 or a.max_tokens < 1:
        p.error("--concurrency and --max-tokens must be >= 1")
    out = Path(a.out) if a.out else RunDir(a.run).keywords
    prep, noun = load_data(a.dataset, a.data_dir, a.run, a.noun)
    if a.teacher in ("genres", "tfidf"):
        words = genre_keywords(prep.items) if a.teacher == "genres" else tfidf_keywords(prep.items)
        summary = write_keywords(prep.items, words, a.teacher, out)
    else:
        teacher = make_teacher(a.teacher, a.model)
        print(f"{len(prep.items)} items ({noun}) -> {out}, teacher {teacher.name}", file=sys.stderr, flush=True)
        summary = extract_keywords(prep.items, teacher, noun, out, concurrency=a.concurrency,
                                   max_tokens=a.max_tokens, progress=not a.no_progress,
                                   log=lambda *m: print(*m, file=sys.stderr, flush=True))
    print(to_json(summary), flush=True)
    return summary
