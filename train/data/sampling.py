"""Which training example comes next: `config.data.sampling`.

- "uniform": every example once per epoch, in a new shuffled order each epoch (the
  pipeline's default `shuffle().repeat()`).
- "class_balanced": every draw picks a class uniformly among the classes present, then an
  example uniformly within it, i.e. example i with probability 1 / (C * count(label_i)):
  classes appear equally often, rare ones' examples repeat more. Draws are i.i.d. with
  replacement, so an "epoch" no longer means each example once.

`ClassBalancedStream` is a random-access source of (effectively) infinite length whose
element k is a pure function of (seed, k): grain's iterator state (the next position) is
all a resume needs, and `stream[p::n]` gives each of n processes disjoint positions of the
one global stream.
"""

from __future__ import annotations

import sys

import numpy as np

from train.data.records import Subset, WithExamples

SAMPLINGS = ("uniform", "class_balanced")
_GOLDEN = 0x9E3779B97F4A7C15
_M64 = 2**64 - 1


def source_labels(source) -> np.ndarray:
    """int64 [len(source)]: every example's label, read in bulk where the source allows."""
    if isinstance(source, Subset):
        return source_labels(source._source)[source.indices]
    if isinstance(source, WithExamples):
        return source_labels(source._source)
    if hasattr(source, "iter_range"):  # TfdsSplit: sequential reads of the label field only.
        rows = source.iter_range(keys=("label",))
    else:
        rows = (source[i] for i in range(len(source)))
    return np.fromiter((ex["label"] for ex in rows), np.int64, len(source))


def _splitmix64(x: int) -> int:
    """splitmix64's step and output function: int -> well-mixed uint64 (as a Python int)."""
    x = (x + _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def hashed_uniform(seed: int, position: int, draw: int) -> float:
    """A uniform in [0, 1) fixed by (seed, position, draw): no state, any order, ~2 us."""
    h = _splitmix64(_splitmix64(seed & _M64) ^ _splitmix64(2 * position + draw))
    return (h >> 11) * 2.0**-53


class ClassBalancedStream:
    """`len` + `[k]` over an infinite class-balanced stream of `source`'s examples.

    Args:
      source: random-access examples (`source[i]`).
      labels: int [len(source)], `source_labels(source)`.
      seed: the stream's seed (the pipeline passes its shuffle seed).
    """

    def __init__(self, source, labels: np.ndarray, seed: int):
        labels = np.asarray(labels)
        if len(labels) != len(source):
            raise ValueError(f"{len(labels)} labels for {len(source)} examples")
        self._source, self._seed = source, int(seed)
        self.classes = np.unique(labels)  # Only classes present can be drawn.
        self._members = [np.flatnonzero(labels == c) for c in self.classes]

    def __len__(self) -> int:
        return sys.maxsize  # Infinite, as `MapDataset.repeat()`.

    def index(self, position: int) -> int:
        """The source index drawn at `position`: class first, then a member of it."""
        u_class = hashed_uniform(self._seed, position, 0)
        u_member = hashed_uniform(self._seed, position, 1)
        members = self._members[int(u_class * len(self._members))]
        return int(members[int(u_member * len(members))])

    def __getitem__(self, position: int):
        return self._source[self.index(int(position))]
