"""BERT's masked-LM examples: choose positions, corrupt them 80/10/10, list the targets.

`mask_tokens` works on a whole batch (vectorised numpy) of the pipeline's format
(train/data/pipeline.py) and returns the fields objectives.MaskedLM reads:
  tokens        int32   [B, L]  the corrupted input
  mlm_positions int32   [B, P]  chosen positions, ascending, padded with 0
  mlm_targets   int32   [B, P]  original ids at those positions, 0 on padding
  mlm_weights   float32 [B, P]  1 for a chosen position, 0 on padding
P = max_predictions is fixed so every batch has the same shapes under jit.

Choice, as Google's create_pretraining_data.py:
- Candidates: pieces inside a sequence (segment_ids > 0) other than [PAD]/[CLS]/[SEP]/
  [MASK]; [UNK] stays a candidate.
- Each packed SEQUENCE (segment) gets its own target n = round(rate * its candidates),
  at least 1 if it has any: BERT counts per instance, and a packed row holds several
  instances, so counting per segment keeps short sequences masked at the same rate.
- A row holds at most P predictions. When the segments' targets exceed P (many short
  packed sequences), choices are taken round-robin over segments (every segment's first
  choice, then every second, ...), so each segment keeps at least one while #segments <= P.
- Of the chosen units, 80% -> [MASK], 10% -> a random non-special piece (uniform over the
  vocabulary minus the special ids), 10% unchanged.
- whole_word: units are words (a piece with word_starts True followed by its non-start
  pieces; a word never crosses a special piece or a segment). Words are taken in random
  order while they fit: a word that would push the segment past its target (in pieces) is
  skipped, as in BERT. If no word fits (e.g. target 1, all words 2+ pieces) the segment
  still gets its first word (our "at least one" rule). All pieces of a word share one
  80/10/10 decision; the random replacement is drawn per piece.

Randomness: all draws are three uniforms per position, `[3, B, L]`: (0) the unit's
priority, (1) its 80/10/10 decision (both read at the unit's first piece), (2) the random
replacement piece. They come from a numpy Generator (dynamic masking) or from
`hashed_uniforms` (static masking: a hash of the seed and the sequence's own pieces).

Dynamic vs static, in the pipeline (`train_transform` / `eval_transform`):
- dynamic (data.mlm_dynamic=True, RoBERTa): grain's `IterDataset.random_map`, whose
  Generator is Philox(seed) at counter (0, 0, 0, batch index in the stream); the batch
  index is part of the iterator state (grain 0.2.18 `_RandomMapDatasetIterator`), so a
  restored iterator masks exactly as an uninterrupted one, and a sequence gets a new
  mask each time it is seen.
- static (mlm_dynamic=False, original BERT's pre-generated masks): a sequence's draws are
  keyed by (seed, its own pieces), not by an example index: the index is lost after
  shuffling and packing, while the content is the example's identity in every epoch,
  every batch and packing layout, and every process count. Identical texts share a mask.
- eval: always static with the fixed EVAL_MASK_SEED, so held-out MLM loss compares across
  runs, checkpoints and eval batch sizes. Rows with example_weight 0 (eval filler) get
  mlm_weights 0.
"""

from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np

EVAL_MASK_SEED = 0
MASK_PROB, RANDOM_PROB = 0.8, 0.1  # The rest (0.1) keep the original piece.
_MASK_SALT = 0x6D6C6D  # Separates the mask seed from the shuffle seed of the same run.


@dataclasses.dataclass(frozen=True, eq=False)
class MaskingInfo:
    """What masking needs from a tokenizer (small, picklable for grain workers)."""

    mask_id: int
    excluded_ids: tuple[int, ...]  # Never candidates: [PAD], [CLS], [SEP], [MASK].
    replacement_ids: np.ndarray  # Non-special ids for the 10% random replacement.
    word_start_table: np.ndarray | None = None  # bool [vocab]: piece begins a word.

    @classmethod
    def from_tokenizer(cls, tok) -> MaskingInfo:
        ids = np.arange(tok.vocab_size)
        table = tok.word_start_mask(ids) if hasattr(tok, "word_start_mask") else None
        return cls(
            mask_id=int(tok.mask_id),
            excluded_ids=tuple(sorted({tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id})),
            replacement_ids=np.setdiff1d(ids, sorted(tok.special_ids)).astype(np.int32),
            word_start_table=None if table is None else np.asarray(table, bool),
        )


def max_predictions(data_cfg) -> int:
    """data.mlm_max_predictions, or ceil(mlm_rate * seq_len) for -1 (BERT: 20 at 128)."""
    p = int(data_cfg.mlm_max_predictions)
    if p == -1:
        p = math.ceil(data_cfg.mlm_rate * data_cfg.seq_len - 1e-9)
    if p < 1:
        raise ValueError(f"config.data.mlm_max_predictions={p} must be >= 1 (or -1)")
    return p


# --- Randomness -----------------------------------------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: uint64 -> well-mixed uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _positions_in_segment(segment_ids: np.ndarray) -> np.ndarray:
    """0.. restarting at every change of segment id along each row."""
    B, L = segment_ids.shape
    idx = np.broadcast_to(np.arange(L), (B, L))
    new = np.ones((B, L), bool)
    new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - np.maximum.accumulate(np.where(new, idx, 0), axis=1)


def hashed_uniforms(tokens, segment_ids, seed: int) -> np.ndarray:
    """Uniforms [3, B, L] in [0, 1) that depend only on `seed`, the pieces of the position's
    own segment and the position within it (static masking; independent of the batch)."""
    tokens = np.asarray(tokens)
    segment_ids = np.asarray(segment_ids)
    B, L = tokens.shape
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        pos = _positions_in_segment(segment_ids).astype(np.uint64)
        piece_hash = _mix(_mix(tokens.astype(np.uint64) + golden) ^ (pos * golden))
        group = np.arange(B)[:, None] * (L + 1) + segment_ids
        real = segment_ids > 0
        seg_hash = np.zeros(B * (L + 1), np.uint64)
        np.add.at(seg_hash, group[real], piece_hash[real])  # Wraps mod 2^64.
        key = _mix(seg_hash[group] ^ _mix(np.uint64(seed % 2**64) + golden))
        draws = [_mix(key + (pos * np.uint64(3) + np.uint64(k + 1)) * golden) for k in range(3)]
    return (np.stack(draws) >> np.uint64(11)).astype(np.float64) * 2.0**-53


# --- Choosing units -----------------------------------------------------------------------


def _row_order_matrix(units, row, rank, key, B):
    """Units sorted per row by (rank within segment, priority) -> [B, T] (-1 padded)."""
    order = units[np.lexsort((key[units], rank[units], row[units]))]
    r = row[order]
    starts = np.searchsorted(r, np.arange(B))
    t = np.arange(len(order)) - starts[r]
    mat = np.full((B, int(t.max()) + 1 if len(t) else 0), -1, np.int64)
    mat[r, t] = order
    return mat


def _greedy(mat, group, length, target, seg_total, row_total, cap, chosen, first_only):
    """BERT's word loop, vectorised over rows: walk each row's units in order, take a unit
    if it fits its segment's target (first_only: if its segment has nothing yet) and the
    row's cap. A row takes at most one unit per step, so `group` is unique per step."""
    for t in range(mat.shape[1]):
        rows = np.nonzero(mat[:, t] >= 0)[0]
        if not len(rows):
            continue
        u = mat[rows, t]
        g, n = group[u], length[u]
        fit = seg_total[g] == 0 if first_only else seg_total[g] + n <= target[g]
        fit &= row_total[rows] + n <= cap
        seg_total[g[fit]] += n[fit]
        row_total[rows[fit]] += n[fit]
        chosen[u[fit]] = True


def mask_tokens(
    tokens,
    segment_ids,
    *,
    rng,
    tokenizer_info,
    mask_rate: float = 0.15,
    max_predictions: int,
    whole_word: bool = False,
    word_starts=None,
) -> dict[str, np.ndarray]:
    """BERT masking of a batch `tokens` [B, L] (or one row [L]); see the module docstring.

    rng: a numpy Generator, or the draws themselves as float [3, B, L] in [0, 1)
      (e.g. `hashed_uniforms(...)`).
    tokenizer_info: a MaskingInfo or a Tokenizer.
    word_starts: bool like `tokens` for whole_word (default: the tokenizer's "▁" table).
    """
    info = (
        tokenizer_info
        if isinstance(tokenizer_info, MaskingInfo)
        else MaskingInfo.from_tokenizer(tokenizer_info)
    )
    tokens = np.asarray(tokens)
    single = tokens.ndim == 1
    tokens = np.atleast_2d(tokens).astype(np.int32)
    segment_ids = np.atleast_2d(np.asarray(segment_ids))
    if segment_ids.shape != tokens.shape:
        raise ValueError(f"segment_ids {segment_ids.shape} != tokens {tokens.shape}")
    if max_predictions < 1:
        raise ValueError(f"max_predictions={max_predictions} must be >= 1")
    if not 0.0 <= mask_rate <= 1.0:
        raise ValueError(f"mask_rate={mask_rate} must be in [0, 1]")
    B, L = tokens.shape
    P = int(max_predictions)
    if isinstance(rng, np.random.Generator):
        u = rng.random((3, B, L))
    else:
        u = np.asarray(rng, np.float64).reshape(3, B, L)

    cand = (segment_ids > 0) & ~np.isin(tokens, info.excluded_ids)
    # Unit starts: every candidate; for whole words only where a word begins (or a run of
    # candidates begins, so a word never spans a special piece or two segments).
    starts = cand.copy()
    if whole_word:
        if word_starts is None:
            if info.word_start_table is None:
                raise ValueError("whole_word=True needs word_starts or a tokenizer")
            word_starts = info.word_start_table[tokens]
        cont = np.zeros((B, L), bool)
        cont[:, 1:] = cand[:, :-1] & (segment_ids[:, 1:] == segment_ids[:, :-1])
        starts &= np.atleast_2d(np.asarray(word_starts, bool)) | ~cont
    flat_starts = np.flatnonzero(starts)
    unit_of = np.cumsum(starts.ravel()) - 1  # Unit id of each candidate position.
    row, col = np.divmod(flat_starts, L)
    group = row * (L + 1) + segment_ids[row, col]  # (row, segment) of each unit.
    key, decision = u[0][row, col], u[1][row, col]
    length = np.bincount(unit_of[cand.ravel()], minlength=len(flat_starts))

    # Per-segment targets: round(rate * candidates), at least 1, at most P.
    seg_groups = np.arange(B)[:, None] * (L + 1) + segment_ids
    n_cand = np.bincount(seg_groups[cand], minlength=B * (L + 1))
    target = np.where(n_cand > 0, np.maximum(1, np.rint(mask_rate * n_cand)), 0)
    target = np.minimum(target, P).astype(np.int64)

    # Rank of each unit within its segment, by priority.
    by_seg = np.lexsort((key, group))
    first = np.searchsorted(group[by_seg], group[by_seg], side="left")
    rank = np.empty(len(by_seg), np.int64)
    rank[by_seg] = np.arange(len(by_seg)) - first

    chosen = np.zeros(len(flat_starts), bool)
    units = np.arange(len(flat_starts))
    if not whole_word:  # Units of one piece: the greedy loop reduces to ranks and a cap.
        eligible = units[rank < target[group]]
        mat = _row_order_matrix(eligible, row, rank, key, B)
        chosen[mat[:, :P][mat[:, :P] >= 0]] = True
    else:
        seg_total = np.zeros(B * (L + 1), np.int64)
        row_total = np.zeros(B, np.int64)
        mat = _row_order_matrix(units, row, rank, key, B)
        _greedy(mat, group, length, target, seg_total, row_total, P, chosen, False)
        empty = (seg_total[group] == 0) & (rank == 0)
        if empty.any():  # No word fitted its target: take the segment's first word.
            mat = _row_order_matrix(units[empty], row, rank, key, B)
            _greedy(mat, group, length, target, seg_total, row_total, P, chosen, True)

    # Expand units to positions and corrupt 80/10/10.
    pos_unit = np.where(cand.ravel(), unit_of, 0).reshape(B, L)
    picked = cand & chosen[pos_unit] if len(chosen) else np.zeros((B, L), bool)
    d = decision[pos_unit] if len(chosen) else np.ones((B, L))
    n_repl = len(info.replacement_ids)
    random_ids = info.replacement_ids[np.minimum((u[2] * n_repl).astype(np.int64), n_repl - 1)]
    out = np.where(picked & (d < MASK_PROB), info.mask_id, tokens)
    out = np.where(picked & (d >= MASK_PROB) & (d < MASK_PROB + RANDOM_PROB), random_ids, out)

    # Chosen positions first (ascending), then pad to P.
    count = picked.sum(1)
    order = np.argsort(~picked, axis=1, kind="stable")[:, :P]
    if order.shape[1] < P:
        order = np.pad(order, ((0, 0), (0, P - order.shape[1])))
    real = np.arange(P)[None, :] < count[:, None]
    positions = np.where(real, order, 0).astype(np.int32)
    result = {
        "tokens": out.astype(np.int32),
        "mlm_positions": positions,
        "mlm_targets": np.where(real, np.take_along_axis(tokens, positions, 1), 0).astype(np.int32),
        "mlm_weights": real.astype(np.float32),
    }
    return {k: v[0] for k, v in result.items()} if single else result


# --- grain transforms -----------------------------------------------------------------


class _Masking:
    def __init__(self, info: MaskingInfo, rate: float, max_predictions: int, whole_word: bool):
        self._kw = dict(
            tokenizer_info=info,
            mask_rate=rate,
            max_predictions=max_predictions,
            whole_word=whole_word,
        )

    def _apply(self, batch: dict, draws) -> dict:
        out = mask_tokens(batch["tokens"], batch["segment_ids"], rng=draws, **self._kw)
        if "example_weight" in batch:  # Eval filler rows (weight 0) must not count.
            out["mlm_weights"] = out["mlm_weights"] * np.asarray(
                batch["example_weight"], np.float32
            ).reshape(-1, 1)
        return {**batch, **out}


class DynamicMasking(_Masking, grain.transforms.RandomMap):
    """A fresh mask per batch from grain's per-element Generator (use with random_map)."""

    def random_map(self, batch: dict, rng: np.random.Generator) -> dict:
        return self._apply(batch, rng)


class StaticMasking(_Masking, grain.transforms.Map):
    """The same mask for a sequence every time: draws keyed by (seed, its pieces)."""

    def __init__(self, info, rate, max_predictions, whole_word, *, seed: int):
        super().__init__(info, rate, max_predictions, whole_word)
        self._seed = int(seed)

    def map(self, batch: dict) -> dict:
        draws = hashed_uniforms(batch["tokens"], batch["segment_ids"], self._seed)
        return self._apply(batch, draws)


def mask_seed(seed: int) -> int:
    """The run seed -> the masking seed (uint32), distinct from the shuffle's."""
    return int(np.random.SeedSequence([int(seed), _MASK_SALT]).generate_state(1)[0])


def add_mlm_masking(
    iter_dataset: grain.IterDataset,
    tokenizer,
    data_cfg,
    *,
    seed: int,
    dynamic: bool | None = None,
) -> grain.IterDataset:
    """Appends masked-LM fields to a grain IterDataset of pipeline batches.

    dynamic: None -> data_cfg.mlm_dynamic. Dynamic masks depend on (seed, the batch's
    index in the stream); static ones on (seed, the sequence's pieces).
    """
    info = MaskingInfo.from_tokenizer(tokenizer)
    args = (info, float(data_cfg.mlm_rate), max_predictions(data_cfg), data_cfg.mlm_whole_word)
    if data_cfg.mlm_dynamic if dynamic is None else dynamic:
        return iter_dataset.random_map(DynamicMasking(*args), seed=mask_seed(seed))
    return iter_dataset.map(StaticMasking(*args, seed=mask_seed(seed)))


def train_transform(tokenizer, data_cfg, *, seed: int):
    """`transform=` for pipeline.make_train_iterator (dynamic per data.mlm_dynamic)."""
    return lambda ds: add_mlm_masking(ds, tokenizer, data_cfg, seed=seed)


def eval_transform(tokenizer, data_cfg):
    """`transform=` for pipeline.make_eval_iterator: static, fixed seed (comparable loss)."""
    return lambda ds: add_mlm_masking(ds, tokenizer, data_cfg, seed=EVAL_MASK_SEED, dynamic=False)
