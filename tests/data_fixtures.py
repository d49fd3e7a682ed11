"""Test helpers of the data layer: a tiny byte-level BPE tokenizer and small synthetic raw files."""

import numpy as np

from thinkrec.data.prepared import Interactions, Prepared

CORPUS = [
    '#Question: A user has given ratings to the following movies: "Toy Story (1995)" (evaluation: Yes) '
    'with description: Animation, Comedy; "Heat (1995)" (evaluation: No). Additionally, we have '
    "information about the user's preferences encoded in the feature. Leverage the information to predict "
    'whether the user would enjoy the movie titled "Casino"? Please begin your answer with "Yes" or "No".'
    "\n#Answer: Yes No. Based on the descriptions and the user's enjoyment of each movie in the historical "
    "sequence, construct a persona of the user's preferences and reevaluate whether",
]


def tiny_tokenizer(vocab_size: int = 400, special=("<UserID>", "<ItemID>")):
    """A GPT-2-style byte-level BPE (the SmolLM2 family) trained offline on a few strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": list(special)})
    return fast


def toy_prepared(rows, items=None, dataset="ml1m") -> Prepared:
    """rows: [(user, item, label, timestamp, split)] already indexed; items default to titled stubs."""
    arr = np.array(rows, dtype=np.int64).reshape(-1, 5)
    inter = Interactions(user=arr[:, 0], item=arr[:, 1], label=arr[:, 2].astype(np.int8),
                         timestamp=arr[:, 3], split=arr[:, 4].astype(np.int8))
    n_items = int(arr[:, 1].max()) + 1
    if items is None:
        items = [{"item": i, "raw_id": str(i + 1), "title": f"Movie {i} ({1990 + i})",
                  "description": "Comedy, Drama" if i % 2 else ""} for i in range(n_items)]
    users = [str(u + 1) for u in range(int(arr[:, 0].max()) + 1)]
    return Prepared(inter, users, items, {"dataset": dataset})
