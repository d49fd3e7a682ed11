"""Prompts: segment-wise token assembly equals tokenising the full string; placeholders; truncation."""

import json

import numpy as np
import pytest

from tests.data_fixtures import tiny_tokenizer, toy_prepared
from thinkrec.data import DataError
from thinkrec.data import prompts
from thinkrec.data.sampler import LengthBucketSampler
from thinkrec.data.tokenize import PromptBuilder

ODD_TITLES = ['Toy Story (1995)', 'Say "Yes" or No?', "Amélie (Le Fabuleux Destin d'Amélie Poulain) (2001)",
              "Heat!!", "2001: A Space Odyssey", "x", "Ça va ... 42", "End with space (1999)"]


def padding_fraction(lengths, batches) -> float:
    """Fraction of padded positions when each batch pads to its longest member."""
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - real / padded


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def ph(tok):
    return {"<UserID>": tok.convert_tokens_to_ids("<UserID>"), "<ItemID>": tok.convert_tokens_to_ids("<ItemID>")}


def random_prepared(seed=0, n=60, n_users=4, n_items=8):
    rng = np.random.default_rng(seed)
    rows = [(int(rng.integers(n_users)), int(rng.integers(n_items)), int(rng.integers(2)),
             int(rng.integers(0, 15)), int(rng.integers(3))) for _ in range(n)]
    items = [{"item": i, "raw_id": str(i), "title": ODD_TITLES[i % len(ODD_TITLES)],
              "description": ["", "Comedy, Drama", "a|b|c", "Sci-Fi!", ", ".join(f"k{j}" for j in range(14))][i % 5]}
             for i in range(n_items)]
    return toy_prepared(rows, items)


@pytest.mark.parametrize("mode,with_ids", [("text", None), ("ids", None), ("reason", None), ("reason", False),
                                           ("ids", "two"), ("reason", "two")])
def test_assembly_equals_full_string_tokenisation(tok, ph, mode, with_ids):
    prep = random_prepared()
    b = PromptBuilder(prep, tok, mode=mode, noun="movie", placeholder_ids=ph, max_len=10_000, with_ids=with_ids)
    b.warm()
    n_ids = 0
    for r in range(len(prep.inter)):
        s = b.sample(r)
        full = tok(b.text(r) + (" Yes" if s.label else " No"))["input_ids"]
        assert list(s.input_ids) + list(s.answer_ids) == full, f"row {r}: {b.text(r)!r}"
        n_ids += len(s.ph_pos)
        assert (s.input_ids[s.ph_pos] == np.where(s.ph_kind == 0, ph["<UserID>"], ph["<ItemID>"])).all()
    assert (n_ids > 0) == (mode != "text" and with_ids is not False)
    if with_ids == "two":
        assert n_ids == 2 * len(prep.inter)


def test_placeholder_slots_hold_history_user_target(tok, ph):
    prep = random_prepared(1)
    b = PromptBuilder(prep, tok, mode="ids", placeholder_ids=ph, max_len=10_000)
    for r in range(len(prep.inter)):
        s = b.sample(r)
        hist = [h for h in b.hist[r] if h >= 0]
        assert s.ph_index.tolist() == [int(prep.inter.item[h]) for h in hist] + [int(prep.inter.user[r]), int(prep.inter.item[r])]
        assert s.ph_kind.tolist() == [1] * len(hist) + [0, 1]
        assert s.n_history == len(hist) and s.yes_pos == len(s.input_ids) - 1
        assert s.answer_ids.tolist() == tok(" Yes" if s.label else " No", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("style", ["ours", "official"])
def test_two_slot_prompt_has_ids_on_the_user_and_target_only(tok, ph, style):
    """--cf-slots two (CoLLM's prompt): the history items are the text of the all-slot prompt without their id
    slots; the user and the target keep theirs; lengths still match the samples."""
    prep = random_prepared(2)
    every = PromptBuilder(prep, tok, mode="reason", placeholder_ids=ph, max_len=10_000, style=style)
    two = PromptBuilder(prep, tok, mode="reason", placeholder_ids=ph, max_len=10_000, with_ids="two", style=style)
    for r in range(len(prep.inter)):
        s = two.sample(r)
        assert s.ph_kind.tolist() == [0, 1] and s.ph_index.tolist() == [int(prep.inter.user[r]), int(prep.inter.item[r])]
        n_hist = every.text(r).count("<ItemID>") - 1  # the history items' slots come first, the target's last
        assert two.text(r) == every.text(r).replace(" with feature <ItemID>", "", n_hist)
        assert two.text(r).count("<ItemID>") == 1 and two.text(r).count("<UserID>") == 1
    assert two.lengths().tolist() == [len(two.sample(r)) for r in range(len(prep.inter))]
    with pytest.raises(ValueError, match="with_ids"):
        PromptBuilder(prep, tok, mode="ids", placeholder_ids=ph, with_ids="three")


def test_item_text_format_and_description():
    items = [{"item": 0, "raw_id": "7", "title": "Heat (1995)", "description": "Action|Crime"}]
    text = prompts.to_text(prompts.item_segments(items[0], 1, True, None, ";"))
    assert text == ' "Heat (1995)" with feature <ItemID> (evaluation: Yes) with description: Action, Crime;'
    text = prompts.to_text(prompts.item_segments(items[0], 0, False, {0: [f"w{i}" for i in range(12)]}))
    assert text == ' "Heat (1995)" (evaluation: No) with description: ' + ", ".join(f"w{i}" for i in range(10))
    assert prompts.plural("business") == "businesses" and prompts.plural("book") == "books"


def test_templates_follow_the_paper(tok, ph):
    prep = toy_prepared([(0, 0, 1, 1, 0), (0, 1, 0, 2, 0), (0, 2, 1, 3, 2)], dataset="yelp")
    text = PromptBuilder(prep, tok, mode="reason", placeholder_ids=ph).text(2)
    assert text.startswith('#Question: A user has given ratings to the following businesses: "Movie 0 (1990)" with '
                           'feature <ItemID> (evaluation: Yes); "Movie 1 (1991)" with feature <ItemID> (evaluation: No)'
                           ' with description: Comedy, Drama. Additionally, we have information about the user\'s '
                           'preferences encoded in the feature <UserID>. Based on the descriptions')
    assert text.endswith('would enjoy the business titled "Movie 2 (1992)" with feature <ItemID>. Please begin your '
                         'analysis with "Yes" or "No".\n#Answer:')
    first = PromptBuilder(prep, tok, mode="text").text(0)
    assert "following businesses: none. Leverage" in first and first.endswith('or "No".\n#Answer:')


def test_truncation_drops_oldest_history_first(tok, ph):
    rows = [(0, i % 8, i % 2, i, 0) for i in range(11)] + [(0, 0, 1, 11, 0)]  # rows 0, 11: same target
    prep = random_prepared()
    prep = toy_prepared(rows, prep.items)
    full = PromptBuilder(prep, tok, mode="ids", placeholder_ids=ph, max_len=10_000)
    whole = full.sample(11)
    assert whole.n_history == 10
    limit = len(whole) - 1
    s = PromptBuilder(prep, tok, mode="ids", placeholder_ids=ph, max_len=limit).sample(11)
    assert len(s) <= limit and s.n_history < 10
    kept = whole.ph_index[:10][10 - s.n_history:]
    assert s.ph_index.tolist() == kept.tolist() + [0, int(prep.inter.item[11])]  # newest kept, target kept
    assert s.answer_ids.tolist() == whole.answer_ids.tolist()
    assert s.input_ids[-20:].tolist() == whole.input_ids[-20:].tolist()  # template tail + target intact
    # with room for no history at all the list reads "none"; with less room it is an error naming the row
    bare = PromptBuilder(prep, tok, mode="ids", placeholder_ids=ph, max_len=10_000).sample(0)
    tight = PromptBuilder(prep, tok, mode="ids", placeholder_ids=ph, max_len=len(bare))
    assert tight.sample(11).n_history == 0
    with pytest.raises(ValueError, match="row 11"):
        PromptBuilder(prep, tok, mode="ids", placeholder_ids=ph, max_len=len(bare) - 1).sample(11)
    # untruncated_lengths: the whole-history length, > max_len exactly for the rows that lose history
    cut = PromptBuilder(prep, tok, mode="ids", placeholder_ids=ph, max_len=limit)
    rows = np.arange(12)
    full_len = cut.untruncated_lengths(rows)
    assert full_len.tolist() == [len(full.sample(r)) for r in rows]
    lost = [cut.sample(r).n_history < full.sample(r).n_history for r in rows]
    assert (full_len > limit).tolist() == lost and any(lost)


def test_reasoning_answer_is_capped_and_ends_with_eos(tok, ph):
    prep = random_prepared()
    b = PromptBuilder(prep, tok, mode="reason", placeholder_ids=ph, max_len=10_000, max_answer_len=7)
    s = b.sample(3, trace="Yes. The user likes comedies and this movie is a comedy with a strong cast.")
    assert len(s.answer_ids) == 8 and s.answer_ids[-1] == tok.eos_token_id
    want = tok(" Yes. The user likes comedies", add_special_tokens=False)["input_ids"][:7]
    assert s.answer_ids[:7].tolist() == want
    with pytest.raises(ValueError, match="placeholder_ids"):
        PromptBuilder(prep, tok, mode="ids")


def test_keyword_file(tmp_path):
    prep = random_prepared()
    path = tmp_path / "keywords.jsonl"
    path.write_text(json.dumps({"item_id": "3", "keywords": ["space", "odyssey"]}) + "\n"
                    + json.dumps({"item_id": "999", "keywords": ["x"]}) + "\n")
    assert prompts.load_keywords(path, prep.items) == {3: ["space", "odyssey"]}
    path.write_text(json.dumps({"item_id": "3"}) + "\n")
    with pytest.raises(DataError, match="keywords.jsonl:1"):
        prompts.load_keywords(path, prep.items)


def test_length_bucket_sampler():
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 900, 1003)
    s = LengthBucketSampler(lengths, batch_size=16, seed=3, pool_batches=20)
    batches = list(s)
    assert len(batches) == len(s)
    assert sorted(i for b in batches for i in b) == list(range(1003))  # every index once
    assert batches == list(LengthBucketSampler(lengths, batch_size=16, seed=3, pool_batches=20))
    s.set_epoch(1)
    assert list(s) != batches  # a new order per epoch
    plain = [list(range(i, min(i + 16, 1003))) for i in range(0, 1003, 16)]
    assert padding_fraction(lengths, batches) < 0.1 < padding_fraction(lengths, plain)
    dl = LengthBucketSampler(lengths, batch_size=16, drop_last=True)
    assert all(len(b) == 16 for b in dl) and len(list(dl)) == len(dl)


@pytest.mark.parametrize("max_len", [10_000, 400, 250, 170])
def test_vectorised_lengths_match_samples(tok, ph, max_len):
    prep = random_prepared(2, n=80)
    b = PromptBuilder(prep, tok, mode="ids", placeholder_ids=ph, max_len=max_len)
    want = []
    for r in range(len(prep.inter)):
        try:
            want.append(len(b.sample(r)))
        except ValueError:  # too long even without history: lengths() still reports the bare length
            want.append(-1)
    got = b.lengths()
    ok = np.array(want) >= 0
    assert ok.sum() > len(want) // 4
    assert np.array_equal(got[ok], np.array(want)[ok]), np.flatnonzero(got[ok] != np.array(want)[ok])


def _cached_smollm2():
    from thinkrec.data.sources._fetch import cache_dir
    path = cache_dir() / "smollm2-135m-instruct" / "tokenizer.json"
    return path if path.exists() else None


@pytest.mark.skipif(_cached_smollm2() is None, reason="no SmolLM2 tokenizer.json in the thinkrec cache")
@pytest.mark.parametrize("mode", ["text", "ids", "reason"])
def test_assembly_equals_full_string_with_smollm2(mode):
    from transformers import PreTrainedTokenizerFast
    real = PreTrainedTokenizerFast(tokenizer_file=str(_cached_smollm2()))
    real.add_special_tokens({"additional_special_tokens": ["<UserID>", "<ItemID>"]})
    ph = {k: real.convert_tokens_to_ids(k) for k in ("<UserID>", "<ItemID>")}
    prep = random_prepared(7, n=50, n_items=8)
    b = PromptBuilder(prep, real, mode=mode, noun="book", placeholder_ids=ph, max_len=10_000)
    for r in range(len(prep.inter)):
        s = b.sample(r)
        assert s.input_ids.tolist() + s.answer_ids.tolist() == real(b.text(r) + (" Yes" if s.label else " No"))["input_ids"]


# --- the official recipe's prompts (thinkrec.recipe "official"): the authors' prompt files verbatim

def _tie_prepared(dataset="ml1m", titles="no-year"):
    """User 0: item 0 (liked) at t=1, item 1 (disliked) at t=2, then the test row (item 2) at t=2 as well:
    the official rule shows item 1 to the test row (same second, earlier in the file), ours does not."""
    items = [{"item": 0, "raw_id": "1", "title": "Shining, The (1980)", "description": "Horror"},
             {"item": 1, "raw_id": "2", "title": "Heat (1995)", "description": "Action, Crime"},
             {"item": 2, "raw_id": "3", "title": "Big (1988)", "description": "Comedy, Fantasy"}]
    return prompts.with_titles(toy_prepared([(0, 0, 1, 1, 0), (0, 1, 0, 2, 0), (0, 2, 1, 2, 2)], items, dataset),
                               titles)


OFFICIAL_END_ANSWER = ' Please begin your answer with "Yes" or "No". \\n#Answer:'
OFFICIAL_USER = " Additionally, we have information about the user's preferences encoded in the feature <UserID>."


@pytest.mark.parametrize("history,shown", [("file", 2), ("strict", 1)])
def test_official_prompts_verbatim(tok, ph, history, shown):
    prep = _tie_prepared()
    his_ids = ['"Shining, The" with feature <ItemID> (evaluation: Yes) with description: Horror',
               '"Heat" with feature <ItemID> (evaluation: No) with description: Action, Crime'][:shown]
    his_text = [h.replace(" with feature <ItemID>", "") for h in his_ids]
    head = "<s>#Question: A user has given high ratings to the following movies: "
    target = '"Big" with description: Comedy, Fantasy'
    want = {
        "text": head + "; ".join(his_text) + ". Leverage the information to predict whether the user would enjoy the "
                "movie titled " + target + "?" + OFFICIAL_END_ANSWER,
        "ids": head + "; ".join(his_ids) + "." + OFFICIAL_USER + " Using all available information, make a "
               "prediction about whether the user would enjoy the movie titled " + target + " with the feature "
               "<ItemID>?" + OFFICIAL_END_ANSWER,
        "reason": head + "; ".join(his_ids) + "." + OFFICIAL_USER + " Based on the descriptions and the user's "
                  "enjoyment of each movie in the historical sequence, construct a persona of the user's preferences "
                  "and reevaluate whether the user would enjoy the movie titled " + target + " with the feature "
                  '<ItemID>. Please begin your analysis with "Yes" or "No". \\n#Answer:',
    }
    for mode, text in want.items():
        b = PromptBuilder(prep, tok, mode=mode, placeholder_ids=ph, history_rule=history, style="official")
        assert b.text(2) == text, mode
        assert "\n" not in b.text(2)  # the two characters backslash-n, not a newline
        s = b.sample(2)
        # no tokenizer BOS (the prompt starts with the text "<s>"); the answer "Yes" follows "#Answer:" directly
        assert s.input_ids.tolist() + s.answer_ids.tolist() == tok(text + "Yes", add_special_tokens=False)["input_ids"]
        assert s.answer_ids.tolist() == tok("Yes", add_special_tokens=False)["input_ids"]
        if mode != "text":
            assert s.ph_index.tolist() == [0, 1][:shown] + [0, 2] and s.ph_kind.tolist() == [1] * shown + [0, 1]


def test_official_empty_history_is_unknow_with_a_zero_item_slot(tok, ph):
    import torch

    from thinkrec.batches import cf_vectors

    prep = _tie_prepared()
    text = PromptBuilder(prep, tok, mode="text", style="official").text(0)
    assert text == ('<s>#Question: A user has given high ratings to the following movies: "Unknow" (evaluation: No) '
                    'with description: . Leverage the information to predict whether the user would enjoy the movie '
                    'titled "Shining, The" with description: Horror?' + OFFICIAL_END_ANSWER)
    b = PromptBuilder(prep, tok, mode="ids", placeholder_ids=ph, style="official")
    assert '"Unknow" with feature <ItemID> (evaluation: No) with description: .' + OFFICIAL_USER in b.text(0)
    s = b.sample(0)
    assert s.ph_index.tolist() == [prompts.NO_ITEM, 0, 0] and s.ph_kind.tolist() == [1, 0, 1]
    assert s.input_ids.tolist() == tok(b.text(0), add_special_tokens=False)["input_ids"]
    ue, ie = torch.randn(1, 4), torch.randn(3, 4)
    v = cf_vectors(s.ph_kind.astype(np.int64), s.ph_index, ue, ie)
    assert v[0].abs().sum() == 0 and torch.equal(v[1], ue[0]) and torch.equal(v[2], ie[0])
    assert b.lengths(np.arange(3)).tolist() == [len(b.sample(r)) for r in range(3)]


@pytest.mark.parametrize("dataset,noun", [("amazon-book", "book"), ("yelp", "business")])
def test_official_prompts_use_the_datasets_noun(tok, ph, dataset, noun):
    text = PromptBuilder(_tie_prepared(dataset), tok, mode="reason", placeholder_ids=ph, style="official").text(2)
    assert f"following {prompts.plural(noun)}: " in text and f"each {noun} in the historical" in text
    assert f"enjoy the {noun} titled" in text and "movie" not in text


def test_official_reasoning_answer_has_no_space_and_no_eos(tok, ph):
    b = PromptBuilder(_tie_prepared(), tok, mode="text", style="official", max_answer_len=409)
    trace = "Yes. The user rated horror highly."
    s = b.sample(2, trace=trace)
    assert s.answer_ids.tolist() == tok(trace, add_special_tokens=False)["input_ids"]
    assert s.answer_ids[-1] != tok.eos_token_id


@pytest.mark.parametrize("mode", ["text", "ids", "reason"])
def test_official_assembly_equals_full_string_tokenisation(tok, ph, mode):
    prep = random_prepared(3)
    b = PromptBuilder(prep, tok, mode=mode, noun="movie", placeholder_ids=ph, max_len=10_000, style="official",
                      history_rule="file")
    for r in range(len(prep.inter)):
        s = b.sample(r)
        full = tok(b.text(r) + prompts.answer_text(s.label, "official"), add_special_tokens=False)["input_ids"]
        assert s.input_ids.tolist() + s.answer_ids.tolist() == full, f"row {r}: {b.text(r)!r}"
    assert b.lengths().tolist() == [len(b.sample(r)) for r in range(len(prep.inter))]


def test_prompt_cli_prints_the_official_string(tmp_path, capsys):
    from thinkrec.data.__main__ import main
    from thinkrec.data.prepared import save_prepared

    save_prepared(_tie_prepared(titles="full"), tmp_path)
    assert main(["prompt", "--run-dir", str(tmp_path), "--split", "test", "--row", "0", "--mode", "ids",
                 "--recipe", "official"]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    assert out.startswith('<s>#Question: A user has given high ratings to the following movies: "Shining, The" with '
                          'feature <ItemID> (evaluation: Yes) with description: Horror; "Heat" with feature')
    assert out.endswith(OFFICIAL_END_ANSWER + "Yes")
    assert main(["prompt", "--run-dir", str(tmp_path), "--split", "test", "--row", "0", "--mode", "ids"]) == 0
    ours = capsys.readouterr().out
    assert '"Heat (1995)"' not in ours and '"Shining, The (1980)"' in ours and ours.rstrip("\n").endswith(" Yes")
