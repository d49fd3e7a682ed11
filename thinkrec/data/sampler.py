"""Length-bucketed batch sampler: batches of similar token length, so padding stays low.

Per epoch (seed + epoch drives one numpy Generator, so the order is deterministic): shuffle all indices,
cut them into pools of `batch_size * pool_batches`, sort each pool by length, cut pools into batches,
then shuffle the batch order. Padding per batch is then the spread of lengths inside a sorted pool slice.

`groups` ([n] ints, e.g. one per (user, history)): rows of a group stay next to each other, so they tend to
share a batch (training batches that share a prompt prefix, thinkrec.batches.collate(share=True)): the
shuffled order is regrouped (groups in the order their first row was drawn) and each pool is sorted by the
group's longest row, group by group. Every row is still drawn once per epoch.

`subsample`: the seeded subsample of rows that training, selection and scoring take (--max-*-samples).
"""

import numpy as np
from torch.utils.data import Sampler


class LengthBucketSampler(Sampler):
    """Yields lists of indices into `lengths` ([n] int token lengths)."""

    def __init__(self, lengths, batch_size: int, seed: int = 0, pool_batches: int = 50,
                 drop_last: bool = False, shuffle: bool = True, groups=None):
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size} must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.groups = None
        if groups is not None:
            _, self.groups = np.unique(np.asarray(groups), return_inverse=True)
            if self.groups.shape != self.lengths.shape:
                raise ValueError(f"groups {np.shape(groups)} and lengths {self.lengths.shape} differ in shape")
            self._n_groups = int(self.groups.max()) + 1 if len(self.groups) else 0
            longest = np.zeros(self._n_groups, dtype=np.int64)
            np.maximum.at(longest, self.groups, self.lengths)
            self._sort_len = longest[self.groups]  # a row sorts by its group's longest row
        self.batch_size, self.seed, self.pool = batch_size, seed, batch_size * max(1, pool_batches)
        self.drop_last, self.shuffle, self.epoch = drop_last, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.groups is not None:  # group-mates together, groups in the order their first row was drawn
            first = np.full(self._n_groups, n, dtype=np.int64)
            np.minimum.at(first, self.groups[order], np.arange(n))
            order = order[np.argsort(first[self.groups[order]], kind="stable")]
        out = []
        for start in range(0, n, self.pool):
            pool = order[start:start + self.pool]
            if self.groups is None:
                pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            else:  # by the group's longest row, a group's rows together (in their drawn order)
                pool = pool[np.lexsort((np.arange(len(pool)), self.groups[pool], self._sort_len[pool]))]
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
