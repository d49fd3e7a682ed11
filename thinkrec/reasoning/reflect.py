"""The reflect loop (paper appendix C.2): ask the teacher about one training sample until it answers right.

    system   "You are a helpful recommender answer with Yes or No."
    user     the C.2 first-turn prompt (the sample's history titles with their labels, the target title)
    -> reply; its Yes/No is the first "yes" or "no" WORD of the answer (case-insensitive, so "Not", "Nobody"
       and "Yesterday" are not answers); no Yes/No counts as wrong
    right    record "<Label>. <reasoning of this round>" (whitespace collapsed, think tags gone)
    wrong    first time: append the assistant's answer and a reflect turn stating the correct answer; later
             rounds replace that last user turn with the next phrasing (six rotate: the paper's three and
             three of ours in the same form), as the official loop does; stop after `max_rounds` answers
    empty    an answer with no text raises max_tokens by 512 (up to 3000) and asks again, as the official
             code does; it does not count as a round

The official loop tests `label word in answer` (a substring test: "Not" counts as "No") and has no cap on
rounds; both are fixed here. A teacher error after its retries ends the sample as a failure with the reason.
"""

import re
from dataclasses import dataclass, field

from thinkrec.data.prompts import REFLECT_TURNS

from .teacher import TeacherError

SYSTEM = "You are a helpful recommender answer with Yes or No."
# three more phrasings in the paper's form, so six rotate as in the official loop (our wording)
MORE_REFLECT_TURNS = (
    "The correct answer is {answer}. Review the user's history from several angles and explain what the previous "
    "analysis overlooked. Analyse again and predict whether the user would enjoy the {noun} titled {target}?",
    "The true response is {answer}. Consider the historical interactions once more, point out the mistake in the "
    "earlier reasoning, and reassess whether the user would like the {noun} called {target}?",
    "The expected answer is {answer}. Re-examine the user's past preferences in detail, identify why the earlier "
    "analysis went wrong, and decide again whether the user would be fond of the {noun} titled {target}?",
)
REFLECTS = tuple(REFLECT_TURNS) + MORE_REFLECT_TURNS
LABEL_WORDS = ("No", "Yes")
EMPTY_TOKENS_STEP, EMPTY_TOKENS_CAP = 512, 3000
_ANSWER = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_THINK = re.compile(r"</?think>", re.IGNORECASE)


def answer_word(text: str) -> str | None:
    """"Yes" or "No": the first yes/no word of the answer (case-insensitive), or None."""
    m = _ANSWER.search(text or "")
    return None if m is None else m.group(1).capitalize()


def collapse(text: str) -> str:
    """Whitespace runs to one space, think tags removed."""
    return " ".join(_THINK.sub(" ", text or "").split())


@dataclass
class Task:
    """One training sample for the teacher."""

    split: str
    row: int
    user_id: str
    item_id: str
    label: int
    prompt: str  # the C.2 first turn
    target: str  # the target title as the prompt writes it
    noun: str


@dataclass
class Outcome:
    ok: bool
    record: dict  # the trace line (ok) or the failure line
    rounds: int = 0
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})


def reflect_turn(k: int, label: int, noun: str, target: str) -> str:
    """The k-th reflect phrasing (0-based, rotating) stating the correct answer."""
    return REFLECTS[k % len(REFLECTS)].format(answer=LABEL_WORDS[label], noun=noun, target=target)


def run_task(teacher, task: Task, max_rounds: int = 6, max_tokens: int = 1024) -> Outcome:
    """Ask, check, reflect; see the module docstring. Never raises for a teacher failure."""
    want = LABEL_WORDS[task.label]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task.prompt}]
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    base = {"split": task.split, "row": task.row, "user_id": task.user_id, "item_id": task.item_id,
            "label": task.label}
    rounds, tokens, last = 0, max_tokens, ""
    while rounds < max_rounds:
        try:
            reply = teacher.chat(messages, tokens)
        except TeacherError as e:
            return Outcome(False, {**base, "kind": "error", "error": str(e), "rounds": rounds, "last_answer": last,
                                   "teacher": teacher.name, "usage": usage}, rounds, usage)
        for k in usage:
            usage[k] += int((reply.usage or {}).get(k, 0) or 0)
        if not reply.content.strip() and tokens < EMPTY_TOKENS_CAP:
            tokens = min(tokens + EMPTY_TOKENS_STEP, EMPTY_TOKENS_CAP)  # room for a reasoning model to finish
            continue
        rounds += 1
        last = reply.content.strip()
        if answer_word(reply.content) == want:
            reason = f"{want}. {collapse(reply.reasoning)}"
            return Outcome(True, {**base, "reason": reason, "rounds": rounds, "teacher": teacher.name,
                                  "usage": usage}, rounds, usage)
        hint = {"role": "user", "content": reflect_turn(rounds - 1, task.label, task.noun, task.target)}
        if rounds == 1:
            messages += [{"role": "assistant", "content": last or "(no answer)"}, hint]
        else:
            messages[-1] = hint
    return Outcome(False, {**base, "kind": "wrong", "error": f"no {want} in {rounds} rounds", "rounds": rounds,
                           "last_answer": last, "teacher": teacher.name, "usage": usage}, rounds, usage)
