"""masking: BERT's choice rules and 80/10/10 statistics, whole words, static/dynamic
masks, resumption and eval masks through the grain pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_helpers import data_config, make_texts

from train.data import pipeline
from train.tasks import masking

L = 24
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4


@pytest.fixture(scope="module")
def info(tiny_tokenizer):
    return masking.MaskingInfo.from_tokenizer(tiny_tokenizer)


def _rows(lengths, L, vocab, seed=0, unk_rate=0.05):
    """Unpacked rows `[CLS] pieces [SEP]` padded: tokens, segment_ids [len(lengths), L]."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(lengths), L), np.int32)
    seg = np.zeros((len(lengths), L), np.int32)
    for i, n in enumerate(lengths):
        body = rng.integers(5, vocab, n - 2)
        body[rng.random(n - 2) < unk_rate] = UNK
        tokens[i, :n] = [CLS, *body, SEP]
        seg[i, :n] = 1
    return tokens, seg


def _packed(seq_lengths, L, vocab, seed=0):
    """One packed row of `[CLS] pieces [SEP]` sequences, segments 1.., then padding."""
    rng = np.random.default_rng(seed)
    tokens, seg, at = np.zeros(L, np.int32), np.zeros(L, np.int32), 0
    for s, n in enumerate(seq_lengths, 1):
        tokens[at : at + n] = [CLS, *rng.integers(5, vocab, n - 2), SEP]
        seg[at : at + n] = s
        at += n
    return tokens, seg


def _targets(tokens, seg, rate, P):
    """Expected picks per (row, segment): max(1, round(rate * candidates)), capped at P."""
    cand = (seg > 0) & ~np.isin(tokens, [PAD, CLS, SEP, MASK])
    want = []
    for r in range(len(tokens)):
        n = [int(cand[r][seg[r] == s].sum()) for s in np.unique(seg[r][seg[r] > 0])]
        want.append([min(P, max(1, int(np.rint(rate * c)))) if c else 0 for c in n])
    return want


def _check_invariants(orig, seg, out, P):
    """Properties every masking result has; returns the chosen bool [B, L]."""
    B = orig.shape[0]
    pos, tgt, w = out["mlm_positions"], out["mlm_targets"], out["mlm_weights"]
    assert pos.shape == tgt.shape == w.shape == (B, P)
    assert pos.dtype == tgt.dtype == np.int32 and w.dtype == np.float32
    assert out["tokens"].shape == orig.shape and out["tokens"].dtype == np.int32
    chosen = np.zeros(orig.shape, bool)
    for r in range(B):
        k = int(w[r].sum())
        assert set(np.unique(w[r])) <= {0.0, 1.0} and w[r, :k].all() and not w[r, k:].any()
        p = pos[r, :k]
        assert (np.diff(p) > 0).all()  # Sorted, unique.
        assert (pos[r, k:] == 0).all() and (tgt[r, k:] == 0).all()
        assert (seg[r, p] > 0).all()  # Inside a sequence, never padding.
        assert not np.isin(orig[r, p], [PAD, CLS, SEP, MASK]).any()  # Never a special.
        assert (tgt[r, :k] == orig[r, p]).all()  # Targets are the original pieces.
        chosen[r, p] = True
    assert (out["tokens"][~chosen] == orig[~chosen]).all()  # Only chosen ones change.
    return chosen


@pytest.mark.parametrize("static", [False, True])
def test_rate_split_and_invariants(info, static):
    B, P, rate = 2048, 8, 0.15
    lengths = np.random.default_rng(1).integers(3, L + 1, B)
    tokens, seg = _rows(lengths, L, 300)
    draws = masking.hashed_uniforms(tokens, seg, 7) if static else np.random.default_rng(7)
    out = masking.mask_tokens(
        tokens, seg, rng=draws, tokenizer_info=info, mask_rate=rate, max_predictions=P
    )
    chosen = _check_invariants(tokens, seg, out, P)
    # Counts are exact: round(0.15 * candidates), at least 1, per sequence.
    want = np.array([t[0] for t in _targets(tokens, seg, rate, P)])
    np.testing.assert_array_equal(chosen.sum(1), want)
    assert (chosen.sum(1) >= 1).all()
    cand = (seg > 0) & ~np.isin(tokens, [PAD, CLS, SEP, MASK])
    frac = chosen.sum() / cand.sum()
    assert abs(frac - rate) < 0.02, frac  # Only rounding and the >= 1 rule move it.
    assert chosen[tokens == UNK].any()  # [UNK] stays a candidate.
    # 80/10/10 among the chosen; tolerance 4 binomial std.
    n = chosen.sum()
    new, old = out["tokens"][chosen], tokens[chosen]
    tol = lambda p: 4 * np.sqrt(p * (1 - p) / n)
    masked = np.mean(new == MASK)
    random_ = np.mean((new != MASK) & (new != old))
    kept = np.mean(new == old)
    p_random = 0.1 * (1 - 1 / len(info.replacement_ids))  # A random draw may hit the original.
    assert abs(masked - 0.8) < tol(0.8), masked
    assert abs(random_ - p_random) < tol(0.1), random_
    assert abs(kept - (1 - 0.8 - p_random)) < tol(0.1), kept
    replacements = new[(new != MASK) & (new != old)]
    assert not np.isin(replacements, [PAD, UNK, CLS, SEP, MASK]).any()
    assert len(np.unique(replacements)) > 100  # Spread over the vocabulary (295 ids).
    # Positions are roughly uniform over the sequence (no bias to the start).
    rel = np.nonzero(chosen)[1] / (lengths[np.nonzero(chosen)[0]] - 1)
    assert abs(rel.mean() - 0.5) < 0.02


def test_single_row_and_one_candidate(info):
    tokens, seg = _rows([3, 2, 4], 8, 300)  # 1 candidate; none; 2 candidates.
    out = masking.mask_tokens(tokens, seg, rng=np.random.default_rng(0), tokenizer_info=info,
                              max_predictions=3)  # fmt: skip
    assert out["mlm_weights"].tolist() == [[1, 0, 0], [0, 0, 0], [1, 0, 0]]
    assert out["mlm_positions"][0, 0] == 1 and out["mlm_targets"][0, 0] == tokens[0, 1]
    assert out["mlm_positions"][2, 0] in (1, 2)
    one = masking.mask_tokens(tokens[0], seg[0], rng=np.random.default_rng(0),
                              tokenizer_info=info, max_predictions=3)  # fmt: skip
    assert one["mlm_positions"].shape == (3,) and one["mlm_weights"].tolist() == [1, 0, 0]


def test_packed_per_segment_targets_and_cap(info):
    # 5 sequences: targets 3, 1, 1, 1 (1 candidate), 1 -> 7 picks; under the cap.
    tokens, seg = _packed([22, 4, 8, 3, 5], 48, 300)
    rng = np.random.default_rng(3)
    out = masking.mask_tokens(tokens[None], seg[None], rng=rng, tokenizer_info=info,
                              max_predictions=10)  # fmt: skip
    chosen = _check_invariants(tokens[None], seg[None], out, 10)[0]
    assert [int(chosen[seg == s].sum()) for s in range(1, 6)] == [3, 1, 1, 1, 1]
    # Many 1-candidate sequences over the cap: P picks, each in a different sequence.
    tokens, seg = _packed([3] * 12, 40, 300)
    for s in range(20):
        out = masking.mask_tokens(tokens[None], seg[None], rng=np.random.default_rng(s),
                                  tokenizer_info=info, max_predictions=5)  # fmt: skip
        chosen = _check_invariants(tokens[None], seg[None], out, 5)[0]
        assert chosen.sum() == 5 and len(np.unique(seg[chosen])) == 5
    # Round robin: a long sequence cannot starve the short ones.
    tokens, seg = _packed([30, 3, 3, 3], 40, 300)  # Targets 4, 1, 1, 1; cap 4.
    out = masking.mask_tokens(tokens[None], seg[None], rng=np.random.default_rng(0),
                              tokenizer_info=info, max_predictions=4)  # fmt: skip
    chosen = _check_invariants(tokens[None], seg[None], out, 4)[0]
    assert [int(chosen[seg == s].sum()) for s in range(1, 5)] == [1, 1, 1, 1]


def _words(tokens, seg, word_len, seed):
    """word_starts with words of random length 1..word_len inside each sequence."""
    rng = np.random.default_rng(seed)
    starts = np.zeros(tokens.shape, bool)
    for r in range(len(tokens)):
        i = 0
        while i < tokens.shape[1]:
            starts[r, i] = True
            i += int(rng.integers(1, word_len + 1))
    starts[np.isin(tokens, [PAD, CLS, SEP])] = True  # As Tokenizer.word_start_mask.
    return starts


def test_whole_word(info):
    B, P, rate = 512, 10, 0.15
    lengths = np.random.default_rng(2).integers(6, L + 1, B)
    tokens, seg = _rows(lengths, L, 300, unk_rate=0)
    starts = _words(tokens, seg, 3, seed=4)
    out = masking.mask_tokens(tokens, seg, rng=np.random.default_rng(5), tokenizer_info=info,
                              mask_rate=rate, max_predictions=P, whole_word=True,
                              word_starts=starts)  # fmt: skip
    chosen = _check_invariants(tokens, seg, out, P)
    want = [t[0] for t in _targets(tokens, seg, rate, P)]
    cand = (seg > 0) & ~np.isin(tokens, [CLS, SEP])
    word_id = np.cumsum(starts | ~cand, axis=1)  # A word: a start and its continuations.
    fallback = 0
    for r in range(B):
        ids = word_id[r][cand[r]]
        for w in np.unique(ids):
            pieces = cand[r] & (word_id[r] == w)
            c = chosen[r][pieces]
            assert c.all() or not c.any()  # All pieces of a word together.
            if c.all():  # One 80/10/10 decision per word: all [MASK] or none.
                m = out["tokens"][r][pieces] == MASK
                assert m.all() or not m.any()
        got = int(chosen[r].sum())
        assert got >= 1
        if got > want[r]:  # Only the "first word if none fits" rule may overshoot.
            assert len(np.unique(word_id[r][chosen[r]])) == 1
            fallback += 1
    assert chosen.sum() / cand.sum() == pytest.approx(rate, abs=0.03)
    assert 0 < fallback < B // 4
    multi = [r for r in range(B) if (np.bincount(word_id[r][chosen[r]]) > 1).any()]
    assert len(multi) > B // 4  # Multi-piece words really are chosen.


def test_whole_word_with_single_piece_words_equals_piece_masking(info):
    tokens, seg = _packed([10, 7, 3, 12, 9], 48, 300)
    tokens, seg = np.stack([tokens] * 64), np.stack([seg] * 64)
    draws = np.random.default_rng(9).random((3, *tokens.shape))
    kw = dict(rng=draws, tokenizer_info=info, max_predictions=6)
    a = masking.mask_tokens(tokens, seg, **kw)
    b = masking.mask_tokens(tokens, seg, whole_word=True, word_starts=np.ones_like(seg, bool),
                            **kw)  # fmt: skip
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_static_draws_depend_on_the_sequence_only(info):
    s, t = _packed([9], 9, 300, seed=1)[0], _packed([11], 11, 300, seed=2)[0]
    row1 = np.concatenate([s, t, np.zeros(4, np.int32)])
    row2 = np.concatenate([t, np.zeros(3, np.int32), s, np.zeros(1, np.int32)])
    seg1 = np.array([1] * 9 + [2] * 11 + [0] * 4)
    seg2 = np.array([1] * 11 + [0] * 3 + [2] * 9 + [0] * 1)
    u = masking.hashed_uniforms(np.stack([row1, row2]), np.stack([seg1, seg2]), 3)
    np.testing.assert_array_equal(u[:, 0, :9], u[:, 1, 14:23])  # s in both rows.
    np.testing.assert_array_equal(u[:, 0, 9:20], u[:, 1, :11])  # t in both rows.
    assert not np.array_equal(u[:, 0, :9], u[:, 0, 9:18])
    other = masking.hashed_uniforms(np.stack([row1]), np.stack([seg1]), 4)
    assert not np.allclose(other[:, 0], u[:, 0])  # The seed matters.
    assert 0 <= u.min() and u.max() < 1 and abs(u[:, :, :20].mean() - 0.5) < 0.1


def test_max_predictions_default():
    cfg = data_config("/unused")
    assert cfg.mlm_max_predictions == -1 and cfg.mlm_rate == 0.15
    assert masking.max_predictions(cfg) == 20  # BERT's 20 at seq_len 128.
    cfg.update(dict(seq_len=20, mlm_max_predictions=-1))
    assert masking.max_predictions(cfg) == 3
    cfg.mlm_max_predictions = 7
    assert masking.max_predictions(cfg) == 7


# --- Through the pipeline -------------------------------------------------------------


@pytest.fixture(scope="module")
def source():
    return [{"text": t, "label": i} for i, t in enumerate(make_texts(64, seed=2, max_words=20))]


def _cfg(**kw):
    return data_config("/unused", **{"seq_len": L, "batch_size": 8, "eval_batch_size": 8, **kw})


def _train(source, tok, cfg, seed):
    return pipeline.make_train_iterator(
        source, tok, cfg, seed=seed, process_index=0, process_count=1,
        transform=masking.train_transform(tok, cfg, seed=seed),
    )  # fmt: skip


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
               for x, y in zip(a, b, strict=True))  # fmt: skip


def _by_label(batches, key):
    """label -> row of `key`, for one epoch's batches."""
    return {int(lab): b[key][i] for b in batches for i, lab in enumerate(b["labels"])}


@pytest.mark.parametrize("dynamic", [True, False])
def test_train_masks_across_epochs(source, tiny_tokenizer, dynamic):
    cfg = _cfg(mlm_dynamic=dynamic)
    batches = _take(_train(source, tiny_tokenizer, cfg, seed=1), 16)  # Two epochs.
    b = batches[0]
    assert {"mlm_positions", "mlm_targets", "mlm_weights", "labels"} <= set(b)
    assert b["mlm_positions"].shape == (8, masking.max_predictions(cfg)) == (8, 4)
    plain = _take(pipeline.make_train_iterator(source, tiny_tokenizer, cfg, seed=1,
                                               process_index=0, process_count=1), 16)  # fmt: skip
    for x, y in zip(batches, plain):
        _check_invariants(y["tokens"], y["segment_ids"], x, 4)
        assert (x["labels"] == y["labels"]).all()
    changed = 0
    for key in ("mlm_positions", "tokens"):
        e1, e2 = _by_label(batches[:8], key), _by_label(batches[8:], key)
        assert sorted(e1) == sorted(e2) == list(range(64))
        changed = max(changed, sum(not np.array_equal(e1[i], e2[i]) for i in range(64)))
    if dynamic:
        assert changed > 48  # A fresh mask each epoch (a few short ones may repeat).
    else:
        assert changed == 0  # Static: the same mask every epoch.
    again = _take(_train(source, tiny_tokenizer, cfg, seed=1), 16)
    assert _same(batches, again)  # Same seed -> same masks.
    other = _take(_train(source, tiny_tokenizer, cfg, seed=2), 8)
    e1, e3 = _by_label(batches[:8], "mlm_positions"), _by_label(other, "mlm_positions")
    assert sum(not np.array_equal(e1[i], e3[i]) for i in range(64)) > 32  # Seed matters.


@pytest.mark.parametrize("packing", [False, True])
def test_resume_gives_identical_masks(source, tiny_tokenizer, packing):
    cfg = _cfg(packing=packing, mlm_whole_word=packing)
    it = _train(source, tiny_tokenizer, cfg, seed=3)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 6)
    resumed = _train(source, tiny_tokenizer, cfg, seed=3)
    resumed.set_state(state)
    got = _take(resumed, 6)
    assert _same(got, expected)
    assert "mlm_positions" in got[0] and got[0]["mlm_weights"].sum() > 0


def test_eval_masks_fixed_and_filler_rows_weightless(source, tiny_tokenizer):
    src = source[:21]  # 3 batches of 8: the last has 3 filler rows.

    def run(cfg):
        it = pipeline.make_eval_iterator(
            src, tiny_tokenizer, cfg, process_index=0, process_count=1,
            transform=masking.eval_transform(tiny_tokenizer, cfg),
        )  # fmt: skip
        return list(it)

    a, b = run(_cfg()), run(_cfg(mlm_dynamic=True))
    assert len(a) == 3 and _same(a, b)  # Two passes: identical masks.
    w = np.concatenate([x["mlm_weights"] for x in a])
    ew = np.concatenate([x["example_weight"] for x in a])
    assert (w[ew == 0] == 0).all() and (w[ew == 1].sum(1) >= 1).all()
    # Static masks do not depend on the batch layout: eval batch 4 gives the same rows.
    c = run(_cfg(eval_batch_size=4))
    for k in ("tokens", "mlm_positions", "mlm_targets"):
        np.testing.assert_array_equal(
            np.concatenate([x[k] for x in a])[:21], np.concatenate([x[k] for x in c])[:21]
        )
