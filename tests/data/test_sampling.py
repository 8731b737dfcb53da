"""Class-balanced sampling: frequencies, determinism, resumption, process shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_helpers import data_config, make_texts

from train.data import pipeline, sampling
from train.data.records import Subset

COUNTS = (300, 60, 20, 5, 1)  # Imbalanced: the largest class is 300x the smallest.
L = 24


@pytest.fixture(scope="module")
def source():
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    texts = make_texts(len(labels), seed=7, max_words=6)
    return [{"text": t, "label": int(y)} for t, y in zip(texts, labels)]


def _cfg(**kw):
    return data_config("/unused", **{"seq_len": L, "batch_size": 8, "sampling": "class_balanced",
                                     **kw})


def _chi_square(observed, expected):
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    return float(((observed - expected) ** 2 / expected).sum())


def test_draws_follow_inverse_class_frequency(source):
    """Reference: P(example i) = 1 / (C * count(label_i)); classes equally often."""
    labels = sampling.source_labels(source)
    stream = sampling.ClassBalancedStream(source, labels, seed=11)
    n = 50_000
    drawn = np.array([stream.index(k) for k in range(n)])
    classes = np.bincount(labels[drawn], minlength=len(COUNTS))
    # 4 degrees of freedom: P(chi2 > 25) ~ 5e-5 for a correct sampler.
    assert _chi_square(classes, [n / len(COUNTS)] * len(COUNTS)) < 25, classes
    # Within the largest class, every member equally likely (299 dof: mean 299, sd ~24).
    big = np.bincount(drawn[labels[drawn] == 0], minlength=COUNTS[0])
    assert _chi_square(big, [big.sum() / COUNTS[0]] * COUNTS[0]) < 299 + 6 * 24.5
    # Per-example probabilities against the formula (total variation distance).
    target = 1.0 / (len(COUNTS) * np.asarray(COUNTS)[labels])
    empirical = np.bincount(drawn, minlength=len(labels)) / n
    assert 0.5 * np.abs(empirical - target).sum() < 0.05


def test_pipeline_batches_are_balanced(source, tiny_tokenizer):
    it = pipeline.make_train_iterator(source, tiny_tokenizer, _cfg(), seed=0,
                                      process_index=0, process_count=1)
    labels = np.concatenate([next(it)["labels"] for _ in range(250)])  # 2,000 draws.
    counts = np.bincount(labels, minlength=len(COUNTS))
    assert _chi_square(counts, [len(labels) / len(COUNTS)] * len(COUNTS)) < 25, counts
    uniform = pipeline.make_train_iterator(source, tiny_tokenizer, _cfg(sampling="uniform"),
                                           seed=0, process_index=0, process_count=1)
    plain = np.concatenate([next(uniform)["labels"] for _ in range(48)])  # ~1 epoch.
    assert np.mean(plain == 0) > 0.7  # Without balancing the majority class dominates.


def test_deterministic_in_seed_and_resumes_exactly(source, tiny_tokenizer):
    def make(seed):
        return pipeline.make_train_iterator(source, tiny_tokenizer, _cfg(), seed=seed,
                                            process_index=0, process_count=1)

    def take(it, n):
        return [next(it) for _ in range(n)]

    a, b, c = take(make(3), 6), take(make(3), 6), take(make(4), 6)
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))

    it = make(3)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # orbax stores it as JSON.
    expected = take(it, 7)
    resumed = make(3)
    resumed.set_state(state)
    for x, y in zip(take(resumed, 7), expected):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_processes_split_one_global_stream(source, tiny_tokenizer):
    """Two processes' batches together are the one-process batches: disjoint positions."""
    single = pipeline.make_train_iterator(source, tiny_tokenizer, _cfg(), seed=5,
                                          process_index=0, process_count=1)
    halves = [pipeline.make_train_iterator(source, tiny_tokenizer, _cfg(), seed=5,
                                           process_index=p, process_count=2) for p in range(2)]
    for _ in range(4):
        whole, parts = next(single), [next(h) for h in halves]
        assert parts[0]["tokens"].shape == (4, L)
        # Process p holds stream positions p, p + 2, ...: interleaving gives the whole batch.
        np.testing.assert_array_equal(whole["tokens"][0::2], parts[0]["tokens"])
        np.testing.assert_array_equal(whole["tokens"][1::2], parts[1]["tokens"])


def test_source_labels_of_a_subset_and_errors(source, tiny_tokenizer):
    sub = Subset(source, [0, 300, 360, 380])
    assert sampling.source_labels(sub).tolist() == [0, 1, 2, 3]
    stream = sampling.ClassBalancedStream(sub, sampling.source_labels(sub), seed=0)
    assert {stream.index(k) for k in range(200)} == {0, 1, 2, 3}  # Indices into the subset.
    unlabelled = [{"text": ex["text"]} for ex in source]
    with pytest.raises(ValueError, match="config.data.sampling='class_balanced' needs"):
        pipeline.make_train_iterator(unlabelled, tiny_tokenizer, _cfg(), seed=0,
                                     process_index=0, process_count=1)
    with pytest.raises(ValueError, match="config.data.sampling='balanced'"):
        pipeline.make_train_iterator(source, tiny_tokenizer, _cfg(sampling="balanced"), seed=0,
                                     process_index=0, process_count=1)
