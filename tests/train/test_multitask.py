"""Multi-task routing (model/multitask.py), its objective and its data mixture
(train/tasks/multitask.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from model.transformer import Model, resolve
from train import objectives
from train.steps import TrainState, make_train_step
from train.tasks import multitask

CLASSES = (5, 3, 4)  # Three tasks with different class counts.


def model_cfg(**overrides):
    fields = dict(vocab_size=50, max_len=16, dropout=0.0, attention_dropout=0.0,
                  adapter_dim=4, num_classes=max(CLASSES), num_tasks=len(CLASSES),
                  task_classes=CLASSES)
    fields.update(overrides)
    return common.model_config("tiny", num_layers=1, hidden=16, num_heads=2, mlp_dim=32,
                               **fields)


@pytest.fixture(scope="module")
def routed():
    model = Model(resolve(model_cfg()))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 50, (6, 8)), jnp.int32)
    params = model.init({"params": jax.random.key(0)}, tokens)["params"]
    params = jax.tree_util.tree_map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                                    params, is_leaf=lambda x: hasattr(x, "unbox"))
    # Non-zero `up` kernels: the adapters must change the output for the test to bite.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
        if "up" in str(p) else x, params)
    return model, params, tokens


def routed_leaves(params):
    """{path: leaf} of the parameters with a leading task axis."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p): x for p, x in flat
            if "adapter" in jax.tree_util.keystr(p) or "classify_head" in
            jax.tree_util.keystr(p)}


def test_each_row_equals_the_unrouted_model_with_its_tasks_slice(routed):
    """Reference: the plain model (one adapter set, one head: num_tasks=0) given slice t
    of every routed parameter computes what the routed model computes for task-t rows."""
    model, params, tokens = routed
    task_ids = jnp.array([0, 1, 2, 2, 1, 0])
    logits = model.apply({"params": params}, tokens, task_ids=task_ids)["classify"]
    plain = Model(resolve(model_cfg(num_tasks=0, task_classes=())))
    routed_paths = routed_leaves(params)
    for t, classes in enumerate(CLASSES):
        sliced = jax.tree_util.tree_map_with_path(
            lambda p, x, t=t: x[t] if jax.tree_util.keystr(p) in routed_paths else x, params)
        expected = plain.apply({"params": sliced}, tokens)["classify"]
        rows = np.flatnonzero(np.asarray(task_ids) == t)
        np.testing.assert_allclose(logits[rows, :classes], expected[rows, :classes],
                                   rtol=1e-5, atol=1e-6)
        # A task's logits beyond its classes can never win.
        assert np.all(np.asarray(logits[rows, classes:]) < -1e30)


def test_a_step_on_task_0_rows_leaves_other_tasks_bitwise_unchanged(routed):
    model, params, tokens = routed
    objective = objectives.MultiTaskClassification(task_names=("a", "b", "c"))
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
             "positions": jnp.broadcast_to(jnp.arange(8), tokens.shape),
             "example_weight": jnp.ones(6), "labels": jnp.array([0, 1, 2, 3, 4, 0]),
             "task_ids": jnp.zeros(6, jnp.int32)}
    tx = optax.adam(1e-2)
    step = jax.jit(make_train_step(model, tx, objective, seed=0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=tx.init(params))
    new_state, _ = step(state, batch)
    before, after = routed_leaves(params), routed_leaves(new_state.params)
    assert len(before) == 12  # 2 adapters x (down, up) x (kernel, bias) + 2 head layers x 2.
    for path in before:
        old, new = np.asarray(before[path]), np.asarray(after[path])
        assert old.shape[0] == len(CLASSES), path
        np.testing.assert_array_equal(new[1:], old[1:], err_msg=path)  # Bitwise.
        assert np.any(new[0] != old[0]), f"{path}: task 0's slice did not train"


def test_objective_reports_each_tasks_accuracy():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.0],
                        [0.0, 0.0, 5.0], [0.0, 2.0, 0.0]])
    batch = {"labels": jnp.array([0, 0, 0, 2, 1]), "task_ids": jnp.array([0, 0, 1, 1, 1]),
             "example_weight": jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])}  # Last: filler.
    objective = objectives.MultiTaskClassification(task_names=("a", "b"))
    loss_sum, weight, sums = objective.loss({"classify": logits}, batch)
    out = objective.finalize({"loss_sum": loss_sum, "weight": weight,
                              **jax.tree_util.tree_map(np.asarray, sums)})
    assert out["accuracy/a"] == pytest.approx(0.5)  # Row 0 right, row 1 wrong.
    assert out["accuracy/b"] == pytest.approx(1.0)  # Rows 2, 3; row 4 has weight 0.
    assert out["accuracy"] == pytest.approx(0.75)
    log_p = jax.nn.log_softmax(logits)
    expected = -float(log_p[0, 0] + log_p[1, 0] + log_p[2, 0] + log_p[3, 2])
    assert float(loss_sum) == pytest.approx(expected, rel=1e-6)
    assert out["loss/b"] == pytest.approx(-float(log_p[2, 0] + log_p[3, 2]) / 2, rel=1e-6)


def test_mixture_counts_follow_temperature_sampling():
    sizes = np.array([1000, 100, 10])
    np.testing.assert_array_equal(multitask.mixture_counts(sizes, 1.0), sizes)
    counts = multitask.mixture_counts(sizes, 2.0)
    p = np.sqrt(sizes) / np.sqrt(sizes).sum()
    np.testing.assert_allclose(counts / counts.sum(), p, atol=1e-3)
    assert counts.sum() == pytest.approx(sizes.sum(), abs=2)
    with pytest.raises(ValueError, match="mixture_temperature"):
        multitask.mixture_counts(sizes, 0.0)


def test_mixture_rows_carry_their_task_through_the_combined_label():
    base = [{"text": f"w{i}", "label": i % 45, "pos": "nvar"[i % 4],
             "lemmas": ["x"] * (1 + i % 5)} for i in range(40)]
    parts = [multitask.LabelledTask(base, name, t)
             for t, name in enumerate(("supersense", "pos", "synset_size"))]
    mixture = multitask.Mixture(parts, [np.arange(40)] * 3, 45, interleave=True)
    rows = [mixture[i] for i in range(len(mixture))]
    batch = multitask.SplitTaskLabels(45).map(
        {"labels": np.array([r["label"] for r in rows])})
    np.testing.assert_array_equal(batch["task_ids"], np.tile([0, 1, 2], 40))
    i = np.arange(40)
    np.testing.assert_array_equal(batch["labels"][0::3], i % 45)
    np.testing.assert_array_equal(batch["labels"][1::3], i % 4)
    np.testing.assert_array_equal(batch["labels"][2::3], np.minimum(1 + i % 5, 3) - 1)
