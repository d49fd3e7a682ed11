"""Prompt text: item descriptions and the paper's templates, rendered as token-friendly segments.

Item text (official format; history items joined with "; ", the list closed with "."):

    "Title"[ with feature <ItemID>] (evaluation: Yes|No)[ with description: kw1, kw2, ...]

The target item is written the same way without the evaluation. The description is up to 10 keywords
from a keyword file (JSON Lines {"item_id": raw id, "keywords": [...]}, written by the reasoning-data
step) when given, else the item's genres/categories from the source; an empty description drops the
" with description: ..." clause. A user without history shows the list as "none".

Modes (noun = movie / book / business, plural by English rule):
    text    stage 1, no CF ids (official stage-1 wording, "ratings" instead of "high ratings" because
            the list holds liked and disliked items with their evaluation):
            #Question: A user has given ratings to the following movies: <HisItemList>. Leverage the
            information to predict whether the user would enjoy the movie titled <Target>? Please begin
            your answer with "Yes" or "No".\\n#Answer:
    ids     stage 2: `text` plus " Additionally, we have information about the user's preferences
            encoded in the feature <UserID>." after the list, and "with feature <ItemID>" in every item
    reason  the paper's C.3 recommendation prompt ("... construct a persona of the user's preferences
            and reevaluate whether ... Please begin your analysis with "Yes" or "No".\\n#Answer:"), with
            ids unless `with_ids=False`
    with_ids=TWO_SLOTS (ids, reason): only the user and the target item carry an id slot, the history items none
            (CoLLM's two-slot prompt; train.py --cf-slots two)

Styles: "ours" (above) or "official", the authors' prompt files verbatim (`--recipe official`): the
literal text "<s>" first (no tokenizer BOS), "high ratings", the two characters backslash-n before
"#Answer:" (after a space), every entry with " with description: " even when empty, the target written
`"Title" with description: ..` followed by " with the feature <ItemID>" in id prompts, "Using all
available information, make a prediction about whether" in the stage-2 ("ids") prompt, and a user
without history shown as one entry "Unknow" labelled No with an empty description (its id slot gets a
zero CF vector: item index -1).

A rendered prompt is `head + groups + tail`: lists of segments, each a `str` or a `Placeholder`. Each
history item is one group (its separator included) so truncation drops whole groups, oldest first.
`teacher_prompt` gives the C.2 text for the reasoning teacher (plain string, no ids).
"""

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from thinkrec.rundir import RunDir

from .errors import malformed

USER_PH = "<UserID>"
ITEM_PH = "<ItemID>"
MODES = ("text", "ids", "reason")
STYLES = ("ours", "official")
NO_ITEM = -1  # the item index of the official "Unknow" entry's id slot: a zero CF vector
NOUNS = {"ml1m": "movie", "ml100k": "movie", "amazon-book": "book", "yelp": "business", "csv": "item"}
MAX_KEYWORDS = 10


@dataclass(frozen=True)
class Placeholder:
    """A CF-id slot: kind 0 = user (index = user index), 1 = item (index = item index)."""

    kind: int
    index: int

    @property
    def text(self) -> str:
        return USER_PH if self.kind == 0 else ITEM_PH


TITLE_STYLES = ("full", "no-year")
_YEAR = re.compile(r"\s+\((\d+)\)")  # the official code's pattern: "Shining, The (1980)" -> "Shining, The"


def with_titles(prep, style: str = "full"):
    """`prep` with its item titles as prompts show them: "full" (as the source gives them) or "no-year" (the
    official code's ML-1M titles, every " (digits)" removed). A new Prepared; `prep` is not changed."""
    if style not in TITLE_STYLES:
        raise ValueError(f"title style {style!r} is not one of {TITLE_STYLES}")
    if style == "full":
        return prep
    items = [dict(it, title=_YEAR.sub("", str(it.get("title", "")))) for it in prep.items]
    return dataclasses.replace(prep, items=items)


def plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def description_of(item: dict, keywords: dict | None) -> str:
    """Keywords (when a keyword file gave any for this item) else the source's genres, at most 10 terms."""
    words = keywords.get(item["item"]) if keywords else None
    if not words:
        words = [w.strip() for w in item.get("description", "").replace("|", ",").split(",")]
    return ", ".join([w for w in words if w][:MAX_KEYWORDS])


def item_segments(item: dict, label: int | None, with_ids: bool, keywords=None, end: str = "") -> list:
    """Segments of one item: ` "Title" [with feature <ItemID>] [(evaluation: ..)] [with description: ..]`.

    Starts with a space and a non-space character, so it can be tokenised apart from what precedes it.
    `end` (";" or ".") is glued to the last text so no piece starts with punctuation.
    """
    segs = [f' "{item["title"]}"']
    rest = ""
    if with_ids:
        segs[0] += " with feature "
        segs.append(Placeholder(1, item["item"]))
    if label is not None:
        rest += f" (evaluation: {'Yes' if label else 'No'})"
    desc = description_of(item, keywords)
    if desc:
        rest += f" with description: {desc}"
    rest += end
    if rest:
        if isinstance(segs[-1], str):
            segs[-1] += rest
        else:
            segs.append(rest)
    return segs


def official_item_segments(item: dict | None, label: int | None, with_ids: bool, keywords=None, end: str = "") -> list:
    """The official entry: ` "Title"[ with feature <ItemID>][ (evaluation: ..)] with description: ..`; the
    description clause is always there (empty: "with description: "). item None: the "Unknow" entry."""
    title = "Unknow" if item is None else item["title"]
    segs = [f' "{title}"']
    if with_ids:
        segs[0] += " with feature "
        segs.append(Placeholder(1, NO_ITEM if item is None else item["item"]))
    rest = "" if label is None else f" (evaluation: {'Yes' if label else 'No'})"
    rest += f" with description: {'' if item is None else description_of(item, keywords)}{end}"
    if isinstance(segs[-1], str):
        segs[-1] += rest
    else:
        segs.append(rest)
    return segs


TWO_SLOTS = "two"  # with_ids value: the user and the target item carry ids, history items none (CoLLM's prompt)


def _uses_ids(mode: str, with_ids) -> bool:
    """Whether the prompt has id slots (the user's and the target's). with_ids: None (the mode's default: ids
    unless "text"), True, False, or TWO_SLOTS (ids on the user and the target only)."""
    if mode not in MODES:
        raise ValueError(f"mode = {mode!r}, expected one of {MODES}")
    if with_ids not in (None, True, False, TWO_SLOTS):
        raise ValueError(f"with_ids = {with_ids!r}, expected None, True, False or {TWO_SLOTS!r}")
    if mode == "text" and with_ids:
        raise ValueError("mode 'text' has no CF ids; use mode 'ids' or 'reason'")
    return (mode != "text") if with_ids is None else bool(with_ids)


def slotted(mode: str, with_ids, slots: str):
    """with_ids for a run whose CF tokens sit on `slots` ("all" or "two"): under "two" a prompt with ids carries
    them on the user and the target only (TWO_SLOTS); train.py and a loaded run build their prompts through it."""
    return TWO_SLOTS if slots == "two" and mode != "text" and with_ids is not False else with_ids


def _history_ids(mode: str, with_ids) -> bool:
    """Whether the history items carry id slots too (every slot, the paper's prompt; not with TWO_SLOTS)."""
    return _uses_ids(mode, with_ids) and with_ids != TWO_SLOTS


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"prompt style {style!r} is not one of {STYLES}")


def render_head(noun: str, style: str = "ours") -> list:
    _check_style(style)
    if style == "official":
        return [f"<s>#Question: A user has given high ratings to the following {plural(noun)}:"]
    return [f"#Question: A user has given ratings to the following {plural(noun)}:"]


def render_group(items: list, item: int, label: int, last: bool, mode: str, with_ids=None, keywords=None,
                 style: str = "ours") -> list:
    """One history item, closed by ";" (or "." when it is the newest one)."""
    make = official_item_segments if style == "official" else item_segments
    return make(items[item], label, _history_ids(mode, with_ids), keywords, "." if last else ";")


EMPTY_GROUP = [" none."]


def empty_group(mode: str, with_ids=None, style: str = "ours") -> list:
    """The history list of a user without history: "none" (ours) or the official "Unknow" entry."""
    if style == "official":
        return official_item_segments(None, 0, _history_ids(mode, with_ids), end=".")
    return list(EMPTY_GROUP)


_USER_SENTENCE = " Additionally, we have information about the user's preferences encoded in the feature "
_OFFICIAL_ASK = {  # the official files' question before the target, by mode (stage 1 / 2 / evaluation)
    "text": " Leverage the information to predict whether the user would enjoy the {noun} titled",
    "ids": ". Using all available information, make a prediction about whether the user would enjoy the {noun} titled",
    "reason": ". Based on the descriptions and the user's enjoyment of each {noun} in the historical sequence, "
              "construct a persona of the user's preferences and reevaluate whether the user would enjoy the "
              "{noun} titled",
}
_OFFICIAL_END = {"text": '? Please begin your answer with "Yes" or "No". \\n#Answer:',
                 "ids": '? Please begin your answer with "Yes" or "No". \\n#Answer:',
                 "reason": '. Please begin your analysis with "Yes" or "No". \\n#Answer:'}


def _official_tail(items: list, target: int, user: int, noun: str, mode: str, ids: bool, keywords) -> list:
    ask = _OFFICIAL_ASK[mode].format(noun=noun)
    tail = [_USER_SENTENCE, Placeholder(0, user), ask] if ids else [" " + ask.lstrip(". ")]
    tail += official_item_segments(items[target], None, False, keywords)
    if ids:
        tail += [" with the feature ", Placeholder(1, target)]
    tail.append(_OFFICIAL_END[mode])
    return tail


def render_tail(items: list, target: int, user: int, noun: str, mode: str, with_ids=None, keywords=None,
                style: str = "ours") -> list:
    """Everything after the history list: the user slot (with ids), the question, the target, "#Answer:"."""
    _check_style(style)
    ids = _uses_ids(mode, with_ids)
    if style == "official":
        return _normalise(_official_tail(items, target, user, noun, mode, ids, keywords))
    tail = []
    if ids:
        tail += [_USER_SENTENCE, Placeholder(0, user)]
    lead = ". " if ids else " "
    if mode == "reason":
        tail += [lead + f"Based on the descriptions and the user's enjoyment of each {noun} in the historical "
                 f"sequence, construct a persona of the user's preferences and reevaluate whether the user would "
                 f"enjoy the {noun} titled"]
        tail += item_segments(items[target], None, ids, keywords)
        tail += ['. Please begin your analysis with "Yes" or "No".\n#Answer:']
    else:
        tail += [lead + f"Leverage the information to predict whether the user would enjoy the {noun} titled"]
        tail += item_segments(items[target], None, ids, keywords)
        tail += ['? Please begin your answer with "Yes" or "No".\n#Answer:']
    return _normalise(tail)


def render(items: list, history: list, target: int, user: int, noun: str, mode: str,
           with_ids: bool | None = None, keywords=None, style: str = "ours"):
    """Render one sample as `(head, groups, tail)`.

    history : [(item_index, label)] oldest first;  target : item index;  user : user index.
    """
    groups = [render_group(items, i, lab, k == len(history) - 1, mode, with_ids, keywords, style)
              for k, (i, lab) in enumerate(history)]
    return (render_head(noun, style), groups or [empty_group(mode, with_ids, style)],
            render_tail(items, target, user, noun, mode, with_ids, keywords, style))


def answer_text(label: int, style: str = "ours") -> str:
    """The plain answer after "#Answer:": " Yes"/" No" (ours) or "Yes"/"No" with no space (official)."""
    word = "Yes" if label else "No"
    return word if style == "official" else " " + word


def _normalise(segs: list) -> list:
    """Glue punctuation that opens a text segment onto the preceding text segment.

    Byte-level BPE pre-tokenisers split text before " word" and " punct", never inside a run like "b?"; a
    text segment that starts without a space is glued (up to its first space) to the text before it, so
    every boundary between two text segments is one where the full string's tokenisation splits too.
    Segments after a placeholder may start with anything: tokenizers split the text at added tokens.
    """
    out = []
    for s in segs:
        if isinstance(s, str) and out and isinstance(out[-1], str) and not s.startswith(" "):
            cut = s.find(" ")
            cut = len(s) if cut < 0 else cut
            out[-1] += s[:cut]
            s = s[cut:]
            if not s:
                continue
        out.append(s)
    return out


def to_text(segments) -> str:
    """The full prompt string, placeholders written as their text."""
    return "".join(s if isinstance(s, str) else s.text for s in segments)


def teacher_prompt(items: list, history: list, target: int, noun: str, keywords=None) -> str:
    """The paper's C.2 first-turn prompt for the reasoning teacher (no CF ids)."""
    his = ";".join(to_text(item_segments(items[i], lab, False, keywords)) for i, lab in history)
    tgt = to_text(item_segments(items[target], None, False, keywords))
    return (f"A user has given high ratings to the following {plural(noun)}:{his or ' none'}. Using all available "
            f"information, make a prediction about whether the user would enjoy the {noun} titled{tgt}?")


REFLECT_TURNS = (
    "The correct response is {answer}. Reflect on multiple aspects based on historical information and explain "
    "the reason for the oversight based on the previous analysis. Reanalyze to make a prediction about whether "
    "the user would enjoy the {noun} titled {target}?",
    "The accurate answer is {answer}. Delve into various aspects considering historical data, elucidate the cause "
    "of the oversight according to the preceding analysis. Conduct a reanalysis to forecast whether the user will "
    "take pleasure in the {noun} named {target}?",
    "The right response is {answer}. Reflect on a variety of aspects with reference to historical information, "
    "and account for the oversight based on the earlier analysis. Reanalyze to determine whether the user would "
    "appreciate the {noun} titled {target}?",
)


def load_keywords(path, items: list) -> dict:
    """Read a keyword file (JSON Lines {"item_id": raw id, "keywords": [str]}) -> {item index: [str]}.

    Unknown item ids are skipped (the file may cover a larger catalogue); a bad line names file and line.
    """
    by_raw = {it["raw_id"]: it["item"] for it in items}
    out = {}
    with open(Path(path), encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                raw, words = str(obj["item_id"]), obj["keywords"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise malformed(path, line_no, f"expected {{\"item_id\", \"keywords\"}} ({e})") from None
            if isinstance(words, str):
                words = words.split(",")
            if raw in by_raw:
                out[by_raw[raw]] = [str(w).strip() for w in words if str(w).strip()][:MAX_KEYWORDS]
    return out


def run_keywords(run, items: list):
    """Keywords of RUN/data/keywords.jsonl when the reasoning-data step has written it, else None."""
    path = RunDir(run).keywords
    return load_keywords(path, items) if path.exists() else None
