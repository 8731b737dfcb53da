"""Length-bucketed training batches (config.data.length_buckets): widths, no example lost
or repeated, determinism, resumption, multi-process agreement, and the same loss as
full-width padding."""

from __future__ import annotations

import collections
import json

import jax
import numpy as np
import pytest
from data_helpers import data_config, make_texts
from flax import linen as nn

from configs.common import LOGICAL_AXIS_RULES, base_config, model_config
from train import model_setup, partitioning, tasks
from train.data import pipeline
from train.optimizer import make_optimizer
from train.steps import make_train_step

L, BUCKETS, BATCH = 24, (8, 16, 24), 4
WINDOW = pipeline._BUCKET_WINDOW


@pytest.fixture(scope="module")
def source():
    """Lengths from 3 to beyond L pieces; `label` = the example's index."""
    texts = make_texts(100, seed=3, min_words=1, max_words=20)
    return [{"text": t, "label": i} for i, t in enumerate(texts)]


def _cfg(buckets=BUCKETS, batch=BATCH):
    return data_config("/unused", seq_len=L, batch_size=batch, length_buckets=buckets)


def _iterator(source, tok, buckets=BUCKETS, seed=0, p=0, n=1, batch=BATCH):
    return pipeline.make_train_iterator(source, tok, _cfg(buckets, batch), seed=seed,
                                        process_index=p, process_count=n)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
               for x, y in zip(a, b, strict=True))


def _rows_by_label(batches):
    """label -> the row's real pieces (the tokens under segment_ids > 0)."""
    return {int(lab): tuple(b["tokens"][i][b["segment_ids"][i] > 0])
            for b in batches for i, lab in enumerate(b["labels"])}


def test_each_batch_is_one_bucket_wide_and_holds_only_rows_that_fit(source, tiny_tokenizer):
    batches = _take(_iterator(source, tiny_tokenizer), 2 * WINDOW)
    widths = collections.Counter()
    for b in batches:
        width = b["tokens"].shape[1]
        assert width in BUCKETS
        assert all(b[k].shape == (BATCH, width) for k in ("tokens", "segment_ids", "positions"))
        lengths = b["segment_ids"].sum(axis=1)
        assert lengths.max() <= width
        assert (b["tokens"][b["segment_ids"] == 0] == tiny_tokenizer.pad_id).all()
        np.testing.assert_array_equal(
            b["positions"], np.where(b["segment_ids"] > 0, np.arange(width), 0))
        widths[width] += 1
    assert len(widths) > 1, widths  # The data really spans several buckets.


def test_same_examples_as_unbucketed_pipeline(source, tiny_tokenizer):
    """Two windows (crossing an epoch): the same multiset of examples, each row encoded
    exactly as the full-width pipeline encodes it."""
    n = 2 * WINDOW
    bucketed = _take(_iterator(source, tiny_tokenizer), n)
    padded = _take(_iterator(source, tiny_tokenizer, buckets=()), n)
    labels = lambda bs: sorted(int(x) for b in bs for x in b["labels"])
    assert labels(bucketed) == labels(padded)
    assert len(set(labels(bucketed))) == len(source)  # 128 rows: every example, some twice.
    assert _rows_by_label(bucketed) == _rows_by_label(padded)
    assert all(b["tokens"].shape[1] == L for b in padded)  # Off: unchanged, full width.


def test_deterministic_in_the_seed(source, tiny_tokenizer):
    a = _take(_iterator(source, tiny_tokenizer, seed=1), WINDOW + 3)
    b = _take(_iterator(source, tiny_tokenizer, seed=1), WINDOW + 3)
    c = _take(_iterator(source, tiny_tokenizer, seed=2), WINDOW + 3)
    assert _same(a, b)
    assert not _same(a, c)


def test_resume_from_json_state(source, tiny_tokenizer):
    it = _iterator(source, tiny_tokenizer, seed=4)
    _take(it, WINDOW - 3)  # Stop mid-window: the state holds the position inside it.
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 8)
    resumed = _iterator(source, tiny_tokenizer, seed=4)
    resumed.set_state(state)
    assert _same(_take(resumed, 8), expected)


def test_processes_agree_on_width_and_split_the_global_batch(source, tiny_tokenizer):
    whole = _take(_iterator(source, tiny_tokenizer, batch=2 * BATCH), WINDOW)
    parts = [_take(_iterator(source, tiny_tokenizer, p=p, n=2, batch=2 * BATCH), WINDOW)
             for p in range(2)]
    for b, b0, b1 in zip(whole, *parts, strict=True):
        assert b0["tokens"].shape == b1["tokens"].shape == (BATCH, b["tokens"].shape[1])
        assert sorted([*b0["labels"], *b1["labels"]]) == sorted(b["labels"])


@pytest.mark.parametrize("buckets", [(8, 16), (16, 8, 24), (1, 24), (8, 8, 24)])
def test_bad_buckets_are_refused(source, tiny_tokenizer, buckets):
    with pytest.raises(ValueError, match="length_buckets"):
        _iterator(source, tiny_tokenizer, buckets=buckets)


def test_train_step_loss_matches_full_width_padding(source, tiny_tokenizer):
    """Padding is masked: a narrow bucket's batch and the same rows padded to seq_len
    give the same loss and the same updated parameters."""
    narrow = next(b for b in _take(_iterator(source, tiny_tokenizer), WINDOW)
                  if b["tokens"].shape[1] < L)
    width = narrow["tokens"].shape[1]
    pad = lambda x, v: np.pad(x, ((0, 0), (0, L - width)), constant_values=v)
    wide = {**narrow, "tokens": pad(narrow["tokens"], tiny_tokenizer.pad_id),
            "segment_ids": pad(narrow["segment_ids"], 0), "positions": pad(narrow["positions"], 0)}

    c = base_config()
    c.model = model_config("tiny", num_layers=1, vocab_size=tiny_tokenizer.vocab_size, max_len=L,
                           num_classes=len(source), dropout=0.0, attention_dropout=0.0)
    c.data.seq_len = L
    mesh = partitioning.make_mesh(c.mesh, jax.devices()[:1])
    model = model_setup.build_model(c)
    tx, schedule = make_optimizer(c.optim, 10)
    objective = tasks.get_task("classify").objective(c)
    boxed, _ = model_setup.abstract_train_state(model, tx, L)
    shardings = model_setup.state_shardings(boxed, mesh, LOGICAL_AXIS_RULES)
    state = model_setup.init_train_state(model, tx, L, 0, shardings)
    step = jax.jit(make_train_step(model, tx, objective, seed=0, schedule=schedule))
    results = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        for batch in (narrow, wide):  # One jit, retraced per width.
            new_state, metrics = step(state, pipeline.to_global_batch(batch, mesh))
            results.append((float(metrics["loss"]),
                            np.asarray(jax.tree_util.tree_leaves(new_state.params)[0])))
    (loss_n, param_n), (loss_w, param_w) = results
    np.testing.assert_allclose(loss_n, loss_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(param_n, param_w, rtol=1e-5, atol=1e-5)
