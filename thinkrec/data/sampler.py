"""Length-bucketed batch sampler: batches of similar token length, so padding stays low.

Per epoch (seed + epoch drives one numpy Generator, so the order is deterministic): shuffle all indices,
cut them into pools of `batch_size * pool_batches`, sort each pool by length, cut pools into batches,
then shuffle the batch order. Padding per batch is then the spread of lengths inside a sorted pool slice.

`subsample`: the seeded subsample of rows that training, selection and scoring take (--max-*-samples).
"""

import numpy as np
from torch.utils.data import Sampler


class LengthBucketSampler(Sampler):
    """Yields lists of indices into `lengths` ([n] int token lengths)."""

    def __init__(self, lengths, batch_size: int, seed: int = 0, pool_batches: int = 50,
                 drop_last: bool = False, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size} must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed, self.pool = batch_size, seed, batch_size * max(1, pool_batches)
        self.drop_last, self.shuffle, self.epoch = drop_last, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        out = []
        for start in range(0, n, self.pool):
            pool = order[start:start + self.pool]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            out.extend(pool[i:i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size))
        if self.drop_last:
            out = [b for b in out if len(b) == self.batch_size]
        if self.shuffle:
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        if not self.drop_last:
            return sum(-(-min(self.pool, n - s) // self.batch_size) for s in range(0, n, self.pool))
        return sum(min(self.pool, n - s) // self.batch_size for s in range(0, n, self.pool))


def subsample(rows, n, seed: int) -> np.ndarray:
    """At most n of `rows`, drawn without replacement by a seeded generator, kept in row order."""
    rows = np.asarray(rows, dtype=np.int64)
    if n is None or n <= 0 or n >= len(rows):
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))
