"""Helpers for the data tests: synthetic corpora and configs."""

from __future__ import annotations

import numpy as np

from configs.common import base_config

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "zu", "pe", "dor", "fin", "gal"]


def make_texts(n: int, seed: int = 0, min_words: int = 2, max_words: int = 14) -> list[str]:
    """`n` distinct pseudo-sentences over a small vocabulary."""
    rng = np.random.default_rng(seed)
    words = sorted({"".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(300)})
    texts, seen = [], set()
    while len(texts) < n:
        t = " ".join(rng.choice(words, size=rng.integers(min_words, max_words + 1)))
        if t not in seen:
            seen.add(t)
            texts.append(t)
    return texts


def data_config(data_dir, **overrides):
    """`base_config().data` with `data_dir` and overrides."""
    c = base_config().data
    c.data_dir = str(data_dir)
    c.update(overrides)
    return c
