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


@pytest.mark.parametrize("mode,with_ids", [("text", None), ("ids", None), ("reason", None), ("reason", False)])
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
