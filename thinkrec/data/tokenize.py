"""Fast prompt tokenisation: every text segment is tokenised once (cached by its string) and a sample's
ids are the concatenation of its segments' ids, with one token per CF placeholder.

Sample structure (what `PromptBuilder.sample(row)` returns; the trainer concatenates prompt + answer):

    input_ids  [P] int64   the prompt: optional BOS, template head, history items (oldest first),
                           the template tail with the target item, ending in "#Answer:"
    answer_ids [A] int64   " Yes" / " No" for a plain sample; " " + trace (+ EOS) for a reasoning sample
                           (style "official": "Yes" / "No" and the trace with no space and no EOS)
    ph_pos     [K] int64   positions in input_ids of placeholder tokens, in prompt order
    ph_kind    [K] int8    0 = user slot, 1 = item slot (history items, then the target, last)
    ph_index   [K] int64   user index (kind 0) or item index (kind 1): what the CF projector embeds
    label, row, n_history  the row's label, its row index, and how many history items were kept

The Yes logit is read at position P - 1 of the concatenation (it predicts answer_ids[0]); the LM loss
covers positions P - 1 .. P + A - 2 predicting answer_ids. Modes without ids give K = 0.

Equality with tokenising the full string: holds for byte-level BPE tokenizers (GPT-2, SmolLM2, Llama-3
pre-tokenisers) when the placeholders are added tokens without lstrip/rstrip, because every text segment
boundary is either an added token (tokenizers split there too) or a position before " word"/" punct" where
the pre-tokeniser splits the full string anyway (see prompts._normalise). tests/test_data_prompts.py checks
this. Differences: a tokenizer whose pre-tokeniser can merge across a space (SentencePiece with
Metaspace, e.g. Llama-2) may tokenise boundaries differently; such prompts are still valid, just not
byte-identical to tokenising the joined string. The BOS (when the tokenizer adds one) is prepended once.

Truncation: when len(prompt) + len(answer) > max_len, whole history items are dropped, oldest first; the
target, the template and the answer are never cut (a reasoning answer is capped at max_answer_len
tokens beforehand). If the prompt still does not fit without any history, ValueError names the row.
"""

from dataclasses import dataclass

import numpy as np

from . import prompts
from .history import build_histories


@dataclass
class Sample:
    input_ids: np.ndarray
    answer_ids: np.ndarray
    ph_pos: np.ndarray
    ph_kind: np.ndarray
    ph_index: np.ndarray
    label: int
    row: int
    n_history: int

    @property
    def yes_pos(self) -> int:
        """Position (in prompt + answer) whose logits predict the first answer token."""
        return len(self.input_ids) - 1

    def __len__(self) -> int:
        return len(self.input_ids) + len(self.answer_ids)


class SegmentTokenizer:
    """Cache `text -> ids` over a HF fast tokenizer; placeholders map to caller-supplied token ids.

    placeholder_ids: one int for every slot, or {"<UserID>": id, "<ItemID>": id}.
    """

    def __init__(self, tokenizer, placeholder_ids):
        self.tok = tokenizer
        if isinstance(placeholder_ids, int):
            placeholder_ids = {prompts.USER_PH: placeholder_ids, prompts.ITEM_PH: placeholder_ids}
        self.ph_ids = (placeholder_ids[prompts.USER_PH], placeholder_ids[prompts.ITEM_PH])
        self.cache = {}
        bos = getattr(tokenizer, "bos_token_id", None)
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.prefix = [bos] if bos is not None and probe and probe[0] == bos else []

    def warm(self, texts) -> None:
        """Tokenise many segments in one batched (parallel, Rust-side) call."""
        todo = list({t for t in texts if t not in self.cache})
        if todo:
            for t, ids in zip(todo, self.tok(todo, add_special_tokens=False)["input_ids"]):
                self.cache[t] = ids

    def ids(self, text: str) -> list:
        out = self.cache.get(text)
        if out is None:
            out = self.cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return out

    def encode(self, segments, start: int, ids: list, ph: list) -> None:
        """Append the ids of `segments` to `ids`; record (position, kind, index) of placeholders in `ph`."""
        for s in segments:
            if isinstance(s, str):
                ids.extend(self.ids(s))
            else:
                ph.append((start + len(ids), s.kind, s.index))
                ids.append(self.ph_ids[s.kind])


DEFAULT_MAX_LEN = 512  # no prompt of the paper's ML-1M split is cut (longest 443 tokens with ids, 465 for C.3)
QUICK_MAX_LEN = 224  # the offline smoke run (ml100k): quick, and train.py says how many rows lose history


def default_max_len(dataset: str | None) -> int:
    """train.py's --max-len default for a dataset: QUICK_MAX_LEN for the offline ml100k run, else DEFAULT_MAX_LEN."""
    return QUICK_MAX_LEN if dataset == "ml100k" else DEFAULT_MAX_LEN


class PromptBuilder:
    """Builds `Sample`s for rows of a Prepared (see the module docstring for the structure).

    Token ids are cached per part: the head once, a history item per (item, label, newest?), the tail per
    target item, so a sample is one np.concatenate of ~13 cached arrays.
    """

    def __init__(self, prep, tokenizer, mode="text", noun=None, max_len=1024, placeholder_ids=None,
                 keywords=None, hist_len=10, with_ids=None, max_answer_len=409, eos_after_trace=None,
                 history_rule="strict", style="ours"):
        if prompts._uses_ids(mode, with_ids) and placeholder_ids is None:
            raise ValueError(f"mode {mode!r} uses CF-id placeholders: pass placeholder_ids (token id(s))")
        self.prep, self.mode, self.with_ids, self.style = prep, mode, with_ids, style
        official = style == "official"
        if eos_after_trace is None:
            eos_after_trace = not official  # the official traces end without EOS
        self.noun = noun or prep.stats.get("noun") or prompts.NOUNS.get(prep.stats.get("dataset"), "item")
        self.max_len, self.max_answer_len, self.keywords = max_len, max_answer_len, keywords
        self.seg = SegmentTokenizer(tokenizer, placeholder_ids if placeholder_ids is not None else -1)
        if official:
            self.seg.prefix = []  # the official prompt starts with the text "<s>", not the tokenizer's BOS
        self.eos = tokenizer.eos_token_id if eos_after_trace else None
        inter = prep.inter
        self.history_rule = history_rule  # thinkrec.data.history: "strict" (ours) or "file" (official ties)
        self.hist = build_histories(inter.user, inter.timestamp, hist_len, history_rule)
        self._item, self._label, self._user = inter.item.tolist(), inter.label.tolist(), inter.user.tolist()
        # [n, hist_len] group keys 4 * item + 2 * label + newest (-1 = padding): one .tolist() per sample
        # instead of per-entry numpy indexing (3x faster assembly measured on the ML-1M split)
        safe = np.maximum(self.hist, 0)
        keys = 4 * inter.item[safe] + 2 * inter.label[safe].astype(np.int64)
        keys[:, -1] += 1
        self._keys = np.where(self.hist >= 0, keys, -1)
        self.answers = tuple(np.array(self.seg.ids(prompts.answer_text(lab, style)), dtype=np.int64) for lab in (0, 1))
        self._head = self._encode(prompts.render_head(self.noun, style))
        empty = prompts.empty_group(mode, with_ids, style)
        self._empty = self._encode(empty)
        self._empty_slots = sum(not isinstance(x, str) for x in empty)  # the official "Unknow" entry's id slot
        self._groups, self._tails = {}, {}
        self._lead = None  # tokens of the tail before the target item (target_start)
        self._prefix = np.array(self.seg.prefix, dtype=np.int64)
        self._ids = prompts._uses_ids(mode, with_ids)  # the user's and the target's slots
        self._hist_ids = prompts._history_ids(mode, with_ids)  # and one per history item
        self._no_ph = np.zeros(0, dtype=np.int64)

    def _encode(self, segments) -> np.ndarray:
        ids, ph = [], []
        self.seg.encode(segments, 0, ids, ph)
        return np.array(ids, dtype=np.int64)

    def _group(self, key: int):
        """Token ids of one history item; key = 4 * item + 2 * label + (1 if the newest item)."""
        out = self._groups.get(key)
        if out is None:
            out = self._groups[key] = self._encode(prompts.render_group(
                self.prep.items, key >> 2, (key >> 1) & 1, key & 1 == 1, self.mode, self.with_ids, self.keywords,
                self.style))
        return out

    def _tail(self, target: int):
        out = self._tails.get(target)
        if out is None:  # user slot index -1 here: slots are read back per row by _placeholders
            out = self._tails[target] = self._encode(prompts.render_tail(
                self.prep.items, target, -1, self.noun, self.mode, self.with_ids, self.keywords, self.style))
        return out

    def history(self, row: int) -> list:
        """[(item index, label)] of the row's history, oldest first."""
        return [(self._item[h], self._label[h]) for h in self.hist[row].tolist() if h >= 0]

    def segments(self, row: int):
        return prompts.render(self.prep.items, self.history(row), self._item[row], self._user[row],
                              self.noun, self.mode, self.with_ids, self.keywords, self.style)

    def text(self, row: int) -> str:
        """The full prompt string of `row` (placeholders as text), before any truncation."""
        head, groups, tail = self.segments(row)
        return prompts.to_text(head + [s for g in groups for s in g] + tail)

    def answer(self, row: int, trace: str | None = None) -> np.ndarray:
        """The plain answer by label (prompts.answer_text); with a trace: " " + trace (official: the trace with no
        space) capped at max_answer_len tokens, then EOS (unless eos_after_trace is off)."""
        if trace is None:
            return self.answers[self._label[row]]
        text = trace.strip() if self.style == "official" else " " + trace.strip()
        ids = self.seg.tok(text, add_special_tokens=False)["input_ids"][: self.max_answer_len]
        return np.array(ids + ([self.eos] if self.eos is not None else []), dtype=np.int64)

    def sample(self, row: int, trace: str | None = None) -> Sample:
        keys = [k for k in self._keys[row].tolist() if k >= 0]
        return self._assemble(keys, self._user[row], self._item[row], self._label[row], int(row),
                              self.answer(row, trace))

    def sample_for(self, user: int, item: int, history: list, label: int = 0, row: int = -1) -> Sample:
        """A plain (Yes/No) sample for a row not in the data: user and item indices, history
        [(item index, label)] oldest first (the newest hist_len are kept), label 0/1 (0 when unknown)."""
        history = list(history)[-self.hist.shape[1]:]
        keys = [4 * int(i) + 2 * int(lab) for i, lab in history]
        if keys:
            keys[-1] += 1
        return self._assemble(keys, int(user), int(item), int(label), int(row), self.answers[int(label)])

    def _assemble(self, keys: list, user: int, item: int, label: int, row: int, answer: np.ndarray) -> Sample:
        """BOS + head + history groups (oldest dropped first until it fits max_len) + tail(item)."""
        n = len(keys)
        groups = [self._groups.get(k) for k in keys]
        if any(g is None for g in groups):
            groups = [self._group(k) for k in keys]
        tail = self._tail(item)
        budget = self.max_len - len(answer) - len(self.seg.prefix)
        total = len(self._head) + len(tail) + sum(len(g) for g in groups)
        drop = 0
        while total > budget and drop < n:
            total -= len(groups[drop])
            drop += 1
        if drop == n:
            total += len(self._empty)
        if total > budget:
            raise ValueError(f"row {row}: the prompt needs {total + len(self.seg.prefix)} tokens and the answer "
                             f"{len(answer)} even without history, over max_len = {self.max_len}")
        input_ids = np.concatenate([self._prefix, self._head, *(groups[drop:] or [self._empty]), tail])
        return Sample(input_ids, answer, *self._placeholders(input_ids, keys[drop:], user, item, row),
                      label, row, n - drop)

    def target_start(self, sample: Sample, item: int) -> int:
        """Where target `item` starts in sample.input_ids. Everything before it (instruction, history, user
        slot, question) does not depend on the target, so the candidates of one user can share it."""
        if self._lead is None:
            segs = prompts.render_tail(self.prep.items, 0, -1, self.noun, self.mode, self.with_ids, self.keywords,
                                       self.style)
            k = next(i for i, s in enumerate(segs) if isinstance(s, str) and s.startswith(' "'))  # the title
            self._lead = len(self._encode(segs[:k]))
        return len(sample.input_ids) - len(self._tail(int(item))) + self._lead

    def _placeholders(self, input_ids: np.ndarray, kept: list, user: int, item: int, row: int):
        """Positions, kinds and indices of the id slots: history items, then the user, then the target.

        Found by scanning for the placeholder token ids (one vectorised compare, much faster than carrying
        positions through the concatenation); the count is checked so a text token equal to a placeholder
        id cannot shift the slots silently.
        """
        if not self._ids:
            return self._no_ph, self._no_ph.astype(np.int8), self._no_ph
        u_id, i_id = self.seg.ph_ids
        hit = input_ids == i_id if u_id == i_id else (input_ids == i_id) | (input_ids == u_id)
        pos = np.flatnonzero(hit)
        hist = ([k >> 2 for k in kept] or [prompts.NO_ITEM] * self._empty_slots) if self._hist_ids else []
        kind = np.ones(len(hist) + 2, dtype=np.int8)
        kind[-2] = 0
        index = np.array(hist + [user, item], dtype=np.int64)
        if len(pos) != len(index):
            raise ValueError(f"row {row}: found {len(pos)} placeholder tokens, expected {len(index)}; does an item "
                             f"title tokenise to a placeholder id {self.seg.ph_ids}?")
        return pos, kind, index

    def lengths(self, rows=None) -> np.ndarray:
        """[len(rows)] token lengths (prompt + plain answer, after truncation) for the length sampler.

        Vectorised over rows: per-part lengths are looked up for the distinct history keys and targets,
        and truncation drops oldest items by a running sum, as `sample` does. Equals `len(sample(r))`.
        """
        rows = np.arange(len(self._item)) if rows is None else np.asarray(rows, dtype=np.int64)
        keys, glen, total = self._full_lengths(rows)
        # after dropping the first j columns the length is total - cumsum[:, j-1]; take the fewest drops
        cum = np.concatenate([np.zeros((len(rows), 1), np.int64), np.cumsum(glen, axis=1)], axis=1)
        fits = (total[:, None] - cum) <= self.max_len
        first_fit = np.where(fits.any(axis=1), fits.argmax(axis=1), cum.shape[1] - 1)
        out = total - cum[np.arange(len(rows)), first_fit]
        has_hist = keys[:, -1] >= 0
        emptied = has_hist & (first_fit == cum.shape[1] - 1) & (glen[:, -1] > 0)
        no_hist = ~has_hist
        return out + len(self._empty) * (emptied | no_hist)

    def untruncated_lengths(self, rows=None) -> np.ndarray:
        """[len(rows)] tokens of each prompt with its whole history (hist_len items) and plain answer: where
        it passes max_len, `sample` drops the oldest history items."""
        rows = np.arange(len(self._item)) if rows is None else np.asarray(rows, dtype=np.int64)
        keys, _, total = self._full_lengths(rows)
        return total + len(self._empty) * (keys[:, -1] < 0)  # no history: the list reads "none"

    def _full_lengths(self, rows):
        """(history keys [R, L], token length of each history item [R, L], untruncated total [R])."""
        self.warm(rows)
        keys = self._keys[rows]  # [R, L], -1 = padding (always on the left)
        uniq = np.unique(keys[keys >= 0])
        part = np.array([len(self._group(k)) for k in uniq.tolist()], dtype=np.int64)
        glen = np.where(keys >= 0, part[np.searchsorted(uniq, np.maximum(keys, 0)).clip(0, max(len(uniq) - 1, 0))]
                        if len(uniq) else 0, 0)
        target = np.asarray(self._item)[rows]
        t_uniq, t_inv = np.unique(target, return_inverse=True)
        t_len = np.array([len(self._tail(t)) for t in t_uniq.tolist()], dtype=np.int64)[t_inv]
        answer = np.array([len(a) for a in self.answers])[np.asarray(self._label)[rows]]
        fixed = len(self._prefix) + len(self._head) + t_len + answer
        return keys, glen, fixed + glen.sum(axis=1)

    def warm(self, rows=None) -> None:
        """Tokenise the distinct texts of `rows` (default all) in batched calls (Rust-side, parallel)."""
        rows = np.arange(len(self._item)) if rows is None else np.asarray(rows)
        items, texts = self.prep.items, set()
        keys = np.unique(self._keys[rows])
        for key in keys[keys >= 0].tolist():
            if key not in self._groups:
                texts.update(s for s in prompts.render_group(items, key >> 2, (key >> 1) & 1, key & 1 == 1, self.mode,
                                                             self.with_ids, self.keywords, self.style)
                             if isinstance(s, str))
        for t in set(np.asarray(self._item)[rows].tolist()) - set(self._tails):
            texts.update(s for s in prompts.render_tail(items, t, -1, self.noun, self.mode, self.with_ids,
                                                        self.keywords, self.style) if isinstance(s, str))
        self.seg.warm(texts)
