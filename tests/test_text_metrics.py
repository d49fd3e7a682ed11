"""thinkrec.text_metrics: hand-computed METEOR / BLEU-4 / ROUGE-L values, and honest 'unavailable' reports."""

import gzip
import math
import os
import re

import pytest

from thinkrec import text_metrics
from thinkrec.text_metrics import explanation_metrics, find_wordnet

_wordnet, _wordnet_reason = find_wordnet()
needs_wordnet = pytest.mark.skipif(_wordnet is None, reason=f"METEOR needs WordNet: {_wordnet_reason}")


@needs_wordnet
def test_meteor_hand_computed():
    # nltk lowercases, then aligns in three stages, each on the words the previous left unmatched:
    #   hyp: user enjoys that car                 ref: this user enjoyed a comfortable auto
    #   exact:    user    (hyp 0 -> ref 1)
    #   Porter:   enjoys / enjoyed -> "enjoy"  (hyp 1 -> ref 2)
    #   WordNet:  the synsets of "car" (car.n.01) have the lemma "auto"  (hyp 3 -> ref 5)
    #   (nltk looks synonyms up for the *stemmed* leftovers: "car" stems to itself)
    # m = 3, P = 3/4, R = 3/6 = 1/2
    # Fmean = P R / (0.9 P + 0.1 R) = (3/8) / (27/40 + 2/40) = 15/29
    # chunks: (0,1)(1,2) are adjacent, (3,5) is not -> 2 chunks; penalty = 0.5 (2/3)^3 = 4/27
    # METEOR = (1 - 4/27) * 15/29 = 23/27 * 15/29 = 115/261 = 0.440613...
    hyp, ref = "User enjoys that car", "This user enjoyed a comfortable auto"
    result = explanation_metrics([hyp], [ref])["meteor"]
    assert result["n"] == 1
    assert result["value"] == pytest.approx(115 / 261, abs=1e-6)
    # the mean over rows: a second, identical-text row scores (1 - 0.5 (1/2)^3) = 15/16 (2 words, 1 chunk)
    two = explanation_metrics([hyp, "the user"], [ref, "the user"])["meteor"]
    assert two["n"] == 2 and two["value"] == pytest.approx((115 / 261 + 15 / 16) / 2, abs=1e-6)


@needs_wordnet
def test_meteor_uses_wordnet_synonyms():
    from nltk.translate.meteor_score import meteor_score

    class NoSynonyms:  # a WordNet that knows no word
        def synsets(self, word):
            return []

    # "car" and "auto" share no stem; only WordNet (car.n.01) matches them: 1 match, 1 chunk,
    # Fmean = 1, penalty = 0.5 -> 0.5. Without synonyms nothing matches -> 0.
    with_wordnet = explanation_metrics(["car"], ["auto"])["meteor"]["value"]
    without = meteor_score([["auto"]], ["car"], wordnet=NoSynonyms())
    assert without == 0.0
    assert with_wordnet == pytest.approx(0.5, abs=1e-9)
    assert with_wordnet > without


@pytest.mark.skipif(
    not os.path.isfile("/usr/share/man/man5/lexnames.5WN.gz"), reason="the lexnames(5WN) man page is not installed"
)
def test_builtin_lexnames_match_wordnet_man_page():
    # The list served when Debian's WordNet lacks the lexnames file must be WordNet 3.0's, in order.
    with gzip.open("/usr/share/man/man5/lexnames.5WN.gz", "rt", errors="replace") as f:
        rows = re.findall(r"^(\d\d)\t(\S+)", f.read(), flags=re.MULTILINE)
    assert [int(i) for i, _ in rows] == list(range(45))
    assert [name for _, name in rows] == text_metrics._WN30_LEXNAMES


def test_bleu4_identical_is_one():
    text = "the user likes thrillers with a strong female lead"
    assert explanation_metrics([text], [text.upper()])["bleu4"] == {"value": pytest.approx(1.0, abs=1e-12), "n": 1}


def test_bleu4_hand_computed():
    # hyp: the cat sat on the mat (6 words)   ref: the cat sat on the red mat (7 words)
    # clipped n-gram precisions: 1-grams 6/6; 2-grams 4/5 (all but "the mat");
    # 3-grams 3/4 (all but "on the mat"); 4-grams 2/3 (all but "sat on the mat")
    # product = 1 * 4/5 * 3/4 * 2/3 = 2/5; brevity penalty exp(1 - 7/6)
    value = explanation_metrics(["The cat sat on the mat"], ["the cat sat on the red mat"])["bleu4"]["value"]
    assert value == pytest.approx(math.exp(1 - 7 / 6) * (2 / 5) ** 0.25, abs=1e-9)
    # method1 smoothing: no 4-gram matches ("a b c d" vs "a b c e"): p4 = 0.1 / 1 instead of 0
    # p1 = 3/4, p2 = 2/3, p3 = 1/2, equal lengths -> (3/4 * 2/3 * 1/2 * 0.1)^(1/4) = 0.025^(1/4)
    smoothed = explanation_metrics(["a b c d"], ["a b c e"])["bleu4"]["value"]
    assert smoothed == pytest.approx(0.025**0.25, abs=1e-9)


def test_bleu4_is_corpus_level():
    # corpus BLEU pools the counts: the hand case above plus an identical 7-word row give
    # numerators 6+7, 4+6, 3+5, 2+4 over 6+7, 5+6, 4+5, 3+4, lengths c = 13, r = 14 (not a mean of rows).
    hyps = ["the cat sat on the mat", "one two three four five six seven"]
    refs = ["the cat sat on the red mat", "one two three four five six seven"]
    expected = math.exp(1 - 14 / 13) * (13 / 13 * 10 / 11 * 8 / 9 * 6 / 7) ** 0.25
    assert explanation_metrics(hyps, refs)["bleu4"]["value"] == pytest.approx(expected, abs=1e-9)


def test_rouge_l_hand_computed():
    # LCS("the cat was found under the bed", "the cat was under the bed") = the cat was under the bed = 6
    # P = 6/7 (hypothesis length 7), R = 6/6; F1 = 2 P R / (P + R) = (12/7) / (13/7) = 12/13
    result = explanation_metrics(["The cat was found under the bed."], ["the cat was under the bed"])["rouge_l"]
    assert result == {"value": pytest.approx(12 / 13, abs=1e-9), "n": 1}
    # mean over rows: a disjoint pair scores 0
    two = explanation_metrics(["the cat was found under the bed", "red"], ["the cat was under the bed", "blue"])
    assert two["rouge_l"]["value"] == pytest.approx(6 / 13, abs=1e-9)


def test_bleurt_without_checkpoint_is_unavailable():
    result = explanation_metrics(["a b"], ["a b"])["bleurt"]
    assert result["value"] is None
    assert result["unavailable"] == "no --bleurt-checkpoint given"


def test_bleurt_missing_directory_is_named(tmp_path):
    missing = str(tmp_path / "no-such-bleurt")
    result = explanation_metrics(["a b"], ["a b"], bleurt_checkpoint=missing)["bleurt"]
    assert result["value"] is None and missing in result["unavailable"]
    # a directory that is not a checkpoint is reported too, not scored
    result = explanation_metrics(["a b"], ["a b"], bleurt_checkpoint=str(tmp_path))["bleurt"]
    assert result["value"] is None and str(tmp_path) in result["unavailable"]


def test_meteor_unavailable_without_wordnet(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("THINKREC_WORDNET", str(empty))
    monkeypatch.setattr(text_metrics, "NLTK_WORDNET_RESOURCE", "corpora/thinkrec-no-such-wordnet")
    monkeypatch.setattr(text_metrics, "SYSTEM_WORDNET_DIR", str(tmp_path / "absent"))
    monkeypatch.setattr(text_metrics, "_readers", {})
    reader, reason = find_wordnet()
    assert reader is None and str(empty) in reason and "wordnet-base" in reason
    result = explanation_metrics(["the cat"], ["the cat"])
    assert result["meteor"]["value"] is None
    assert "wordnet-base" in result["meteor"]["unavailable"]
    assert result["bleu4"]["value"] is not None  # only the metric that needs WordNet is off


def test_empty_input_reports_no_rows():
    result = explanation_metrics([], [])
    assert set(result) == {"meteor", "bleu4", "rouge_l", "bleurt"}
    assert all(m == {"value": None, "unavailable": "no rows"} for m in result.values())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        explanation_metrics(["a", "b"], ["a"])
    with pytest.raises(TypeError, match=r"references\[1\]"):
        explanation_metrics(["a", "b"], ["a", None])
