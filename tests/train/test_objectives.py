"""Objectives against numpy references: (class-weighted) cross-entropy, macro-F1, MLM."""

import jax.numpy as jnp
import numpy as np

from train.objectives import Classification, MaskedLM, balanced_class_weights, macro_f1


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_class_weighted_cross_entropy_matches_torch_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    labels = np.array([0, 1, 1, 3, 3, 3])
    real = np.array([1, 1, 1, 1, 1, 0], np.float32)  # Last row is eval padding.
    weights = balanced_class_weights(np.bincount(labels[:5], minlength=4))
    # sklearn "balanced": n / (classes present * count); class 2 is absent -> 0.
    np.testing.assert_allclose(weights, [5 / (3 * 1), 5 / (3 * 2), 0.0, 5 / (3 * 2)])
    objective = Classification(num_classes=4, class_weights=weights)
    batch = {"labels": jnp.asarray(labels), "example_weight": jnp.asarray(real)}
    loss_sum, weight, sums = objective.loss({"classify": jnp.asarray(logits)}, batch)
    nll = -log_softmax(logits)[np.arange(6), labels]
    w = np.asarray(weights)[labels] * real
    # torch.nn.CrossEntropyLoss(weight=w): sum(w_y * nll) / sum(w_y).
    np.testing.assert_allclose(loss_sum / weight, (w * nll).sum() / w.sum(), rtol=1e-6)
    assert float(sums["examples"]) == 5
    assert float(sums["correct"]) == float(((logits.argmax(-1) == labels) * real).sum())
    assert float(np.asarray(sums["confusion"]).sum()) == 5


def test_macro_f1_matches_hand_computation():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0, 0])
    confusion = np.zeros((4, 4))
    np.add.at(confusion, (labels, predicted), 1)
    f1 = []
    for c in range(3):  # Class 3 never occurs: excluded, as sklearn does.
        tp = np.sum((labels == c) & (predicted == c))
        precision = tp / max(np.sum(predicted == c), 1)
        recall = tp / max(np.sum(labels == c), 1)
        f1.append(0 if tp == 0 else 2 * precision * recall / (precision + recall))
    np.testing.assert_allclose(macro_f1(confusion), np.mean(f1))


def test_masked_lm_loss_only_at_chosen_positions():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 3))
    weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    loss_sum, total, sums = MaskedLM().loss(
        {"mlm": jnp.asarray(logits)},
        {"mlm_targets": jnp.asarray(targets), "mlm_weights": jnp.asarray(weights)})
    nll = -np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss_sum, (nll * weights).sum(), rtol=1e-6)
    assert float(total) == 3 and float(sums["examples"]) == 3
