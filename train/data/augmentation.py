"""Text augmentation of training batches: token deletion and random substitution.

`config.data.token_dropout` deletes each non-special piece with that probability;
`config.data.token_substitution` then replaces each surviving non-special piece with that
probability by a piece drawn uniformly from the non-special vocabulary. Special pieces
([PAD], [CLS], [SEP], [UNK], [MASK]) are never deleted nor substituted, nor drawn.

Works on whole batches of the pipeline's format (train/data/pipeline.py), padded or
packed: after deletion every row is compacted to the left (order kept), re-padded with
[PAD], and `segment_ids` / `positions` are rebuilt from the surviving pieces, so a row is
exactly what the pipeline would have made from the shorter sequence. It runs before
masked-LM masking (the masking then sees the augmented text).

Randomness, as dynamic masking (train/tasks/masking.py): grain's `random_map` gives batch k
of the stream a Generator keyed by (seed, k); k is part of the iterator state, so a
restored iterator augments exactly as an uninterrupted one. Training only: eval batches
never pass through here.
"""

from __future__ import annotations

import grain
import numpy as np

_AUGMENT_SALT = 0x617567  # Separates the augmentation seed from the shuffle/mask seeds.
_TOKEN_FIELDS = ("tokens", "segment_ids", "positions")


def augment_seed(seed: int) -> int:
    """The run seed -> the augmentation seed (uint32), distinct from the shuffle's."""
    return int(np.random.SeedSequence([int(seed), _AUGMENT_SALT]).generate_state(1)[0])


def check_rates(data_cfg) -> tuple[float, float]:
    """(token_dropout, token_substitution), each checked to lie in [0, 1)."""
    rates = []
    for key in ("token_dropout", "token_substitution"):
        rate = float(data_cfg.get(key, 0.0))
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"config.data.{key}={rate} must be in [0, 1)")
        rates.append(rate)
    return rates[0], rates[1]


def positions_in_segment(segment_ids: np.ndarray) -> np.ndarray:
    """int32 [B, L]: 0.. restarting at each new segment id along a row, 0 on padding."""
    B, L = segment_ids.shape
    idx = np.broadcast_to(np.arange(L), (B, L))
    new = np.ones((B, L), bool)
    new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=1)
    return np.where(segment_ids > 0, idx - start, 0).astype(np.int32)


def augment_tokens(batch: dict, draws: np.ndarray, *, dropout: float, substitution: float,
                   special_ids: np.ndarray, replacement_ids: np.ndarray, pad_id: int) -> dict:
    """Deletes then substitutes pieces of a batch; returns a new batch dict.

    Args:
      batch: tokens / segment_ids / positions int32 [B, L] (+ per-row fields, kept).
      draws: float [3, B, L] uniforms in [0, 1): (0) delete?, (1) substitute?, (2) which
        replacement (both 1 and 2 read at the piece's position after compaction).
      special_ids: ids never deleted or substituted; replacement_ids: int32 [R] to draw from.
    """
    for key, value in batch.items():
        if key not in _TOKEN_FIELDS and np.ndim(value) > 1:
            raise ValueError(f"Token augmentation runs before per-piece field {key!r} exists "
                             "(compose it before masked-LM masking)")
    tokens, segment_ids = batch["tokens"], batch["segment_ids"]
    B, L = tokens.shape
    candidate = (segment_ids > 0) & ~np.isin(tokens, special_ids)
    keep = (segment_ids > 0) & ~(candidate & (draws[0] < dropout))
    # Stable sort puts the kept pieces first, in order: deletion closes the gaps.
    order = np.argsort(~keep, axis=1, kind="stable")
    real = np.arange(L)[None, :] < keep.sum(axis=1, keepdims=True)
    tokens = np.where(real, np.take_along_axis(tokens, order, axis=1), pad_id)
    segment_ids = np.where(real, np.take_along_axis(segment_ids, order, axis=1), 0)

    substitute = real & ~np.isin(tokens, special_ids) & (draws[1] < substitution)
    pick = np.minimum((draws[2] * len(replacement_ids)).astype(np.int64),
                      len(replacement_ids) - 1)
    tokens = np.where(substitute, replacement_ids[pick], tokens)
    return {**batch, "tokens": tokens.astype(np.int32),
            "segment_ids": segment_ids.astype(np.int32),
            "positions": positions_in_segment(segment_ids)}


class TokenAugmentation(grain.transforms.RandomMap):
    """Deletion + substitution with grain's per-batch Generator (use with random_map)."""

    def __init__(self, tokenizer, dropout: float, substitution: float):
        ids = np.arange(tokenizer.vocab_size)
        self._special = np.array(sorted(tokenizer.special_ids), np.int32)
        self._replacements = np.setdiff1d(ids, self._special).astype(np.int32)
        self._pad = int(tokenizer.pad_id)
        self._dropout, self._substitution = dropout, substitution

    def random_map(self, batch: dict, rng: np.random.Generator) -> dict:
        draws = rng.random((3, *batch["tokens"].shape))
        return augment_tokens(batch, draws, dropout=self._dropout,
                              substitution=self._substitution, special_ids=self._special,
                              replacement_ids=self._replacements, pad_id=self._pad)


def train_transform(tokenizer, data_cfg, *, seed: int):
    """`transform=` for pipeline.make_train_iterator, or None when both rates are 0."""
    dropout, substitution = check_rates(data_cfg)
    if dropout == 0.0 and substitution == 0.0:
        return None
    augmentation = TokenAugmentation(tokenizer, dropout, substitution)
    return lambda ds: ds.random_map(augmentation, seed=augment_seed(seed))
