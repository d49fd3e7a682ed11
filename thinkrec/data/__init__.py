"""Data layer: sources, the paper's time splits, histories, item text, prompts, fast tokenisation.

    prepare(dataset, data_dir=None, out=RUN, noun=None) -> Prepared   writes RUN/data (see prepared.py)
    load_prepared(RUN) -> Prepared
    history.build_histories(user, timestamp, max_len=10) -> [n, max_len] int64 row indices
    tokenize.PromptBuilder(prep, tokenizer, mode, noun, max_len, placeholder_ids).sample(row) -> Sample
    sampler.LengthBucketSampler(lengths, batch_size, seed)   (imports torch, so not imported here)
"""

from .errors import DataError
from .prepare import prepare
from .prepared import SPLITS, Interactions, Prepared, load_prepared, save_prepared

__all__ = ["prepare", "load_prepared", "save_prepared", "Prepared", "Interactions", "SPLITS", "DataError"]
