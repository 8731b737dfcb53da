"""UniLM's pre-training mix (Dong et al. 2019): some masked-LM rows become prefix-LM rows.

With config.data.prefix_lm_fraction = p > 0 (task "mlm"), each training row is a
prefix-LM row with probability p, else a masked-LM row (train/tasks/masking.py). Every
batch carries both kinds of fields, with fixed shapes, so one compiled step trains both:
  tokens, mlm_positions, mlm_targets, mlm_weights   as masking.py; on prefix-LM rows the
                                                    tokens are the original ones and
                                                    mlm_weights 0
  prefix_mask    bool    [B, L]  prefix-LM rows: each segment's prefix; masked-LM rows:
                                 every real token (fully bidirectional)
  targets        int32   [B, L]  prefix-LM rows: the next piece of the same segment, else
                                 [PAD]; [PAD] on masked-LM rows
  target_weights float32 [B, L]  1 where `targets` is in its segment's continuation

Every packed segment of a prefix-LM row gets its own prefix: for n >= 2 pieces, its first
k, k uniform in 1..n-1, so prefix and continuation are both non-empty (a one-piece segment
is all prefix and predicts nothing). The model's "prefix" mask (model/attention.py) then
lets a piece see its own segment's prefix and its own segment's pieces up to itself.
Position i predicts piece i + 1 when that piece is in the continuation of i's segment, the
closing [SEP] included; never across segments, never padding.

Randomness follows masking's, so a restored iterator mixes exactly as an uninterrupted
one. Dynamic (data.mlm_dynamic): the batch's grain Generator draws masking's [3, B, L],
then [2, B, L] here. Static: `masking.hashed_uniforms` under a second seed. Draw 0 summed
over a row's segment starts, mod 1, chooses the row (< p: prefix-LM; static: a function
of every sequence the row packs); draw 1 at a segment's first position its split.

Evaluation stays pure masked-LM with fixed masks (every row bidirectional, target_weights
0), so held-out MLM loss compares across fractions and with train/forgetting.py.
"""

from __future__ import annotations

import grain
import numpy as np

from train.tasks import masking

_PREFIX_LM_SALT = 0x756E696C6D  # Separates the rows' and splits' seed from the mask seed.


def prefix_lm_fraction(data_cfg) -> float:
    """data.prefix_lm_fraction, checked to be in [0, 1)."""
    fraction = float(data_cfg.get("prefix_lm_fraction", 0.0))
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"config.data.prefix_lm_fraction={fraction} must be in [0, 1)")
    return fraction


def prefix_lm_fields(tokens, segment_ids, lm_rows, split_draws, pad_id: int):
    """prefix_mask, targets, target_weights (module docstring) of a batch [B, L].

    lm_rows: bool [B], the prefix-LM rows; split_draws: float [B, L] in [0, 1), read at
    each segment's first position. Rows not in lm_rows get every real token as prefix
    and no targets.
    """
    tokens = np.asarray(tokens)
    segment_ids = np.asarray(segment_ids)
    lm_rows = np.asarray(lm_rows, bool)
    B, L = tokens.shape
    real = segment_ids > 0
    index = np.broadcast_to(np.arange(L), (B, L))
    new = np.ones((B, L), bool)
    new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = np.maximum.accumulate(np.where(new, index, 0), axis=1)  # The segment's first.
    in_segment = index - start
    group = np.arange(B)[:, None] * (L + 1) + segment_ids
    length = np.bincount(group[real], minlength=B * (L + 1))[group]
    draw = np.take_along_axis(np.asarray(split_draws, np.float64), start, axis=1)
    split = np.where(length >= 2, 1 + np.floor(draw * (length - 1)), length)
    split = np.minimum(split, np.maximum(length - 1, 1))  # Guards a draw of exactly 1.0.
    lm = lm_rows[:, None] & real
    next_same = np.zeros((B, L), bool)  # The next piece belongs to the same segment.
    next_same[:, :-1] = real[:, :-1] & (segment_ids[:, 1:] == segment_ids[:, :-1])
    weights = lm & next_same & (in_segment + 1 >= split)
    next_tokens = np.concatenate([tokens[:, 1:], np.full((B, 1), pad_id, tokens.dtype)], 1)
    return {
        "prefix_mask": np.where(lm_rows[:, None], real & (in_segment < split), real),
        "targets": np.where(lm & next_same, next_tokens, pad_id).astype(np.int32),
        "target_weights": weights.astype(np.float32),
    }


def row_draws(draws, segment_ids) -> np.ndarray:
    """[B] uniforms: `draws` [B, L] summed over each row's segment starts, mod 1."""
    segment_ids = np.asarray(segment_ids)
    first = np.ones(segment_ids.shape, bool)
    first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return np.mod(np.sum(np.where(first & (segment_ids > 0), draws, 0.0), axis=1), 1.0)


# --- grain transforms -----------------------------------------------------------------


class _Mixing(masking._Masking):
    def __init__(self, info, rate, max_predictions, whole_word, *, fraction: float,
                 pad_id: int):
        super().__init__(info, rate, max_predictions, whole_word)
        self._fraction, self._pad_id = float(fraction), int(pad_id)

    def _mix(self, batch: dict, mask_draws, lm_draws) -> dict:
        out = self._apply(batch, mask_draws)
        lm_rows = row_draws(lm_draws[0], batch["segment_ids"]) < self._fraction
        fields = prefix_lm_fields(batch["tokens"], batch["segment_ids"], lm_rows,
                                  lm_draws[1], self._pad_id)
        if "example_weight" in batch:
            fields["target_weights"] *= np.asarray(batch["example_weight"],
                                                   np.float32).reshape(-1, 1)
        column = lm_rows[:, None]  # Prefix-LM rows: original pieces, nothing masked.
        out["tokens"] = np.where(column, batch["tokens"], out["tokens"]).astype(np.int32)
        for key in ("mlm_positions", "mlm_targets", "mlm_weights"):
            out[key] = np.where(column, 0, out[key]).astype(out[key].dtype)
        return {**out, **fields}


class DynamicMixing(_Mixing, grain.transforms.RandomMap):
    """Fresh rows, splits and masks per batch from grain's per-element Generator."""

    def random_map(self, batch: dict, rng: np.random.Generator) -> dict:
        shape = np.shape(batch["tokens"])
        mask_draws = rng.random((3, *shape))  # First, as DynamicMasking draws them.
        return self._mix(batch, mask_draws, rng.random((2, *shape)))


class StaticMixing(_Mixing, grain.transforms.Map):
    """The same choice for a row every time: draws keyed by (seed, its pieces)."""

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._seed = int(seed)
        self._lm_seed = int(np.random.SeedSequence([self._seed, _PREFIX_LM_SALT])
                            .generate_state(1)[0])

    def map(self, batch: dict) -> dict:
        tokens, segment_ids = batch["tokens"], batch["segment_ids"]
        return self._mix(batch, masking.hashed_uniforms(tokens, segment_ids, self._seed),
                         masking.hashed_uniforms(tokens, segment_ids, self._lm_seed)[:2])


class _Bidirectional(grain.transforms.Map):
    """Eval: every row a masked-LM row; the prefix-LM fields present but inert."""

    def __init__(self, pad_id: int):
        self._pad_id = int(pad_id)

    def map(self, batch: dict) -> dict:
        rows = np.zeros(np.shape(batch["tokens"])[0], bool)
        return {**batch, **prefix_lm_fields(batch["tokens"], batch["segment_ids"], rows,
                                            np.zeros(np.shape(batch["tokens"])), self._pad_id)}


def add_prefix_lm_mixing(iter_dataset: grain.IterDataset, tokenizer, data_cfg, *,
                         seed: int, dynamic: bool | None = None) -> grain.IterDataset:
    """Appends masked-LM and prefix-LM fields (module docstring) to pipeline batches.

    dynamic: None -> data_cfg.mlm_dynamic. Seeds as masking.add_mlm_masking's.
    """
    info = masking.MaskingInfo.from_tokenizer(tokenizer)
    args = (info, float(data_cfg.mlm_rate), masking.max_predictions(data_cfg),
            data_cfg.mlm_whole_word)
    kwargs = dict(fraction=prefix_lm_fraction(data_cfg), pad_id=tokenizer.pad_id)
    seed = masking.mask_seed(seed)
    if data_cfg.mlm_dynamic if dynamic is None else dynamic:
        return iter_dataset.random_map(DynamicMixing(*args, **kwargs), seed=seed)
    return iter_dataset.map(StaticMixing(*args, seed=seed, **kwargs))


def train_transform(tokenizer, data_cfg, *, seed: int):
    """`transform=` for pipeline.make_train_iterator (dynamic per data.mlm_dynamic)."""
    return lambda ds: add_prefix_lm_mixing(ds, tokenizer, data_cfg, seed=seed)


def eval_transform(tokenizer, data_cfg):
    """`transform=` for pipeline.make_eval_iterator: masking's fixed masks on every row."""
    mask = masking.eval_transform(tokenizer, data_cfg)
    return lambda ds: mask(ds).map(_Bidirectional(tokenizer.pad_id))
