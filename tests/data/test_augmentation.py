"""Token deletion / substitution: a per-row reference, rates, specials, determinism, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_helpers import data_config, make_texts

from train.data import augmentation, pipeline

L = 32


@pytest.fixture(scope="module")
def source():
    return [{"text": t, "label": i % 5} for i, t in enumerate(make_texts(200, seed=3))]


def _cfg(**kw):
    return data_config("/unused", **{"seq_len": L, "batch_size": 16, "eval_batch_size": 16,
                                     **kw})


def _train(source, tok, cfg, seed=0, augment=True):
    transform = augmentation.train_transform(tok, cfg, seed=seed) if augment else None
    return pipeline.make_train_iterator(source, tok, cfg, seed=seed, process_index=0,
                                        process_count=1, transform=transform)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _reference_row(tokens, segments, draws, dropout, substitution, special, replacements):
    """One row, piece by piece: delete, compact, then substitute at the new positions."""
    kept = [(t, s) for t, s, u in zip(tokens, segments, draws[0])
            if s > 0 and (t in special or u >= dropout)]
    out_t, out_s, out_p = [0] * len(tokens), [0] * len(tokens), [0] * len(tokens)
    for j, (t, s) in enumerate(kept):
        if t not in special and draws[1][j] < substitution:
            t = replacements[min(int(draws[2][j] * len(replacements)), len(replacements) - 1)]
        out_t[j], out_s[j] = t, s
        out_p[j] = 0 if j == 0 or kept[j - 1][1] != s else out_p[j - 1] + 1
    return out_t, out_s, out_p


@pytest.mark.parametrize("packing", [False, True])
def test_matches_per_row_reference(source, tiny_tokenizer, packing):
    batch = next(pipeline.make_train_iterator(source, tiny_tokenizer, _cfg(packing=packing),
                                              seed=1, process_index=0, process_count=1))
    draws = np.random.default_rng(0).random((3, *batch["tokens"].shape))
    special = np.array(sorted(tiny_tokenizer.special_ids))
    replacements = np.setdiff1d(np.arange(tiny_tokenizer.vocab_size), special)
    out = augmentation.augment_tokens(batch, draws, dropout=0.3, substitution=0.2,
                                      special_ids=special, replacement_ids=replacements,
                                      pad_id=tiny_tokenizer.pad_id)
    for r in range(len(batch["tokens"])):
        want = _reference_row(batch["tokens"][r].tolist(), batch["segment_ids"][r].tolist(),
                              draws[:, r], 0.3, 0.2, set(special.tolist()), replacements)
        assert out["tokens"][r].tolist() == want[0]
        assert out["segment_ids"][r].tolist() == want[1]
        assert out["positions"][r].tolist() == want[2]
    assert all(out[k].dtype == np.int32 for k in ("tokens", "segment_ids", "positions"))
    if packing:  # Several sequences per row survive, each still [CLS] ... [SEP].
        assert (out["segment_ids"].max(axis=1) > 1).any()


def test_rates_and_special_pieces(source, tiny_tokenizer):
    tok = tiny_tokenizer
    special = np.array(sorted(tok.special_ids))
    plain = _take(_train(source, tok, _cfg(), augment=False), 40)
    dropped = _take(_train(source, tok, _cfg(token_dropout=0.2)), 40)
    swapped = _take(_train(source, tok, _cfg(token_substitution=0.15)), 40)
    n_plain = n_kept = n_pieces = n_changed = 0
    for a, d, s in zip(plain, dropped, swapped):
        np.testing.assert_array_equal(a["labels"], d["labels"])  # Same examples, same order.
        content = (a["segment_ids"] > 0) & ~np.isin(a["tokens"], special)
        n_plain += content.sum()
        n_kept += ((d["segment_ids"] > 0) & ~np.isin(d["tokens"], special)).sum()
        for b in (d, s):  # [CLS] first, [SEP] last, [PAD] after; fields consistent.
            lengths = (b["segment_ids"] > 0).sum(axis=1)
            rows = np.arange(len(lengths))
            assert (b["tokens"][:, 0] == tok.cls_id).all()
            assert (b["tokens"][rows, lengths - 1] == tok.sep_id).all()
            real = np.arange(L)[None, :] < lengths[:, None]
            assert (b["tokens"][~real] == tok.pad_id).all()
            np.testing.assert_array_equal(b["segment_ids"], real.astype(np.int32))
            np.testing.assert_array_equal(b["positions"], np.where(real, np.arange(L), 0))
        # Substitution keeps every position; specials stay, content changes at ~rate.
        np.testing.assert_array_equal(s["segment_ids"], a["segment_ids"])
        np.testing.assert_array_equal(s["tokens"][~content], a["tokens"][~content])
        assert not np.isin(s["tokens"][content], special).any()
        n_pieces += content.sum()
        n_changed += (s["tokens"] != a["tokens"])[content].sum()
    # Binomial: thousands of pieces, so +-0.03 is > 4 standard deviations.
    assert 1 - n_kept / n_plain == pytest.approx(0.2, abs=0.03)
    r = tok.vocab_size - len(special)  # A draw may hit the original piece (1 / r).
    assert n_changed / n_pieces == pytest.approx(0.15 * (1 - 1 / r), abs=0.03)


def test_deterministic_resumable_and_off_by_default(source, tiny_tokenizer):
    cfg = _cfg(token_dropout=0.1, token_substitution=0.1)
    a, b = _take(_train(source, tiny_tokenizer, cfg, seed=2), 5), \
        _take(_train(source, tiny_tokenizer, cfg, seed=2), 5)
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))

    it = _train(source, tiny_tokenizer, cfg, seed=2)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # The checkpoint's JSON round trip.
    expected = _take(it, 4)
    resumed = _train(source, tiny_tokenizer, cfg, seed=2)
    resumed.set_state(state)
    for x, y in zip(_take(resumed, 4), expected):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert augmentation.train_transform(tiny_tokenizer, _cfg(), seed=0) is None


def test_eval_batches_never_augmented(source, tiny_tokenizer):
    def eval_tokens(cfg):
        return [b["tokens"] for b in pipeline.make_eval_iterator(
            source, tiny_tokenizer, cfg, process_index=0, process_count=1)]

    plain = eval_tokens(_cfg())
    augmented_cfg = eval_tokens(_cfg(token_dropout=0.5, token_substitution=0.5))
    assert all(np.array_equal(x, y) for x, y in zip(plain, augmented_cfg))


@pytest.mark.parametrize("key", ["token_dropout", "token_substitution"])
def test_rate_errors_name_the_key(tiny_tokenizer, key):
    with pytest.raises(ValueError, match=f"config.data.{key}=1.0 must be in"):
        augmentation.train_transform(tiny_tokenizer, _cfg(**{key: 1.0}), seed=0)
