"""Continual fine-tuning: the forgetting metrics (train/experiments/continual.py), EWC
(train/ewc.py) and the replay buffer (train/tasks/multitask.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import ewc
from train.experiments import continual
from train.tasks import multitask

# A scripted run of 3 tasks: R[i, j] = accuracy on task j after training task i.
R = np.array([[0.80, 0.10, 0.30],
              [0.60, 0.90, 0.35],
              [0.50, 0.70, 0.95]])


def test_forgetting_and_backward_transfer_match_a_hand_computation():
    # Task 0: best after it was learned max(0.80, 0.60) = 0.80, at the end 0.50 -> 0.30.
    # Task 1: best max(0.90) = 0.90, at the end 0.70 -> 0.20.
    np.testing.assert_allclose(continual.forgetting_per_task(R), [0.30, 0.20])
    assert continual.average_forgetting(R) == pytest.approx(0.25)
    # BWT: ((0.50 - 0.80) + (0.70 - 0.90)) / 2.
    assert continual.backward_transfer(R) == pytest.approx(-0.25)
    assert continual.average_accuracy(R) == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    # The max is over phases before the last: a task that improves later has negative
    # forgetting (0.5 - 0.7), and BWT is its mirror image here.
    rising = np.array([[0.5, 0.0], [0.7, 0.9]])
    assert continual.average_forgetting(rising) == pytest.approx(-0.2)
    assert continual.backward_transfer(rising) == pytest.approx(0.2)
    assert continual.average_forgetting(R[:1, :1]) == 0.0


def test_summary_tests_accuracy_and_forgetting_against_naive_per_seed():
    """Three seeds of scripted matrices: A and F per seed as the hand computation above,
    each mitigation against naive by scipy's paired t-test, in results and report."""
    import types

    from scipy import stats

    shifts = (0.0, 0.05, -0.02)  # Per seed: what the seed does to every method alike.
    mitigated = np.array([[0.80, 0.10, 0.30], [0.78, 0.88, 0.35], [0.75, 0.72, 0.93]])
    # Per-seed noise on the mitigation: R[2, 2] moves A only, R[1, 0] F only (task 0's
    # best accuracy before the end), so both differences vary over seeds: testable.
    jitter = ((0.0, 0.01), (0.02, -0.01), (0.01, 0.03))
    matrices = {"naive": [R + s for s in shifts], "replay": []}
    for s, (on_a, on_f) in zip(shifts, jitter):
        matrix = mitigated + s
        matrix[2, 2] += on_a
        matrix[1, 0] += on_f
        matrices["replay"].append(matrix)
    cont = types.SimpleNamespace(seeds=(0, 1, 2), l2sp_strength=1.0, ewc_strength=1000.0)
    results = continual.summarize({m: [r.tolist() for r in v] for m, v in matrices.items()},
                                  ("a", "b", "c"), cont, 3)
    for metric, key in (("average_accuracy", "accuracy_vs_naive"),
                        ("average_forgetting", "forgetting_vs_naive")):
        function = getattr(continual, metric)
        naive, replay = ([function(r) for r in matrices[m]] for m in ("naive", "replay"))
        assert results["methods"]["replay"][metric] == pytest.approx(replay)
        vs = results["methods"]["replay"][key]
        assert vs["difference"] == pytest.approx(np.mean(np.subtract(replay, naive)))
        assert vs["p_value"] == pytest.approx(stats.ttest_rel(replay, naive).pvalue)
    results["plot"] = "first_task_accuracy.png"
    text = continual.report(results, ("a", "b", "c"))
    (row,) = [line for line in text.splitlines() if line.startswith("| replay |")]
    a, f = (results["methods"]["replay"][k] for k in ("accuracy_vs_naive",
                                                       "forgetting_vs_naive"))
    assert row.endswith(f"| {100 * a['difference']:+.1f} pt, {a['test']} | "
                        f"{100 * f['difference']:+.1f} pt, {f['test']} |"), row


# A tiny model: softmax regression, log p(y | x) = log_softmax(x W + b)[y].
def log_likelihood(params, batch):
    logits = batch["x"] @ params["w"] + params["b"]
    return jnp.take_along_axis(jax.nn.log_softmax(logits), batch["labels"][:, None], 1)[:, 0]


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32),
              "b": rng.normal(size=(3,)).astype(np.float32)}
    x = rng.normal(size=(10, 4)).astype(np.float32)
    y = rng.integers(0, 3, 10).astype(np.int32)
    weight = np.ones(10, np.float32)
    weight[-2:] = 0.0  # Filler rows: not examples.
    return params, x, y, weight


def test_fisher_is_the_mean_squared_per_example_gradient(tiny):
    params, x, y, weight = tiny
    batches = [{"x": x[:6], "labels": y[:6], "example_weight": weight[:6]},
               {"x": x[6:], "labels": y[6:], "example_weight": weight[6:]}]
    fisher = ewc.diagonal_fisher(log_likelihood, params, batches)
    # numpy: d log p / d logits = onehot(y) - softmax; W's gradient is x ⊗ that.
    logits = x @ params["w"] + params["b"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = np.eye(3)[y] - p
    real = weight > 0
    grad_w = x[:, :, None] * delta[:, None, :]
    np.testing.assert_allclose(fisher["w"], (grad_w[real] ** 2).mean(0), rtol=1e-5)
    np.testing.assert_allclose(fisher["b"], (delta[real] ** 2).mean(0), rtol=1e-5)


def test_ewc_penalty_and_its_gradient_match_numpy(tiny, tmp_path):
    params, *_ = tiny
    rng = np.random.default_rng(1)
    anchor = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    fisher = {k: rng.uniform(size=v.shape).astype(np.float32) for k, v in params.items()}
    strength = 3.0
    expected = 0.5 * strength * sum(np.sum(fisher[k] * (params[k] - anchor[k]) ** 2)
                                    for k in params)
    assert float(ewc.penalty(params, anchor, fisher, strength)) == pytest.approx(
        expected, rel=1e-5)
    # The transform: anchor = the params it is initialised on, F from the file (two
    # files summed: online EWC).
    half = {k: v / 2 for k, v in fisher.items()}
    # Its method's directory need not exist yet (the first Fisher precedes phase 1's run).
    first = ewc.save_fisher(str(tmp_path / "seed=0" / "ewc" / "f0.npz"), half)
    path = ewc.save_fisher(str(tmp_path / "f1.npz"), half, previous=first)
    tx = ewc.add_ewc_gradient(strength, path)
    state = tx.init(anchor)
    grads = {k: np.ones_like(v) for k, v in params.items()}
    updates, _ = tx.update(grads, state, params)
    penalty_grad = jax.grad(ewc.penalty)(params, anchor, fisher, strength)
    for k in params:
        np.testing.assert_allclose(updates[k], 1.0 + strength * fisher[k] *
                                   (params[k] - anchor[k]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(updates[k] - 1.0, penalty_grad[k], rtol=1e-4, atol=1e-6)
    # Chained before Adam as the optimizer does: at the anchor it changes nothing.
    chained = optax.chain(ewc.add_ewc_gradient(strength, path), optax.sgd(0.1))
    same, _ = chained.update(grads, chained.init(params), params)
    np.testing.assert_allclose(same["w"], -0.1 * grads["w"])


def test_ewc_fisher_file_errors_name_the_key(tmp_path, tiny):
    params, *_ = tiny
    with pytest.raises(FileNotFoundError, match="ewc_fisher"):
        ewc.add_ewc_gradient(1.0, str(tmp_path / "missing.npz")).init(params)
    bad = ewc.save_fisher(str(tmp_path / "bad.npz"), {"w": np.ones((2, 2)), "b": np.ones(3)})
    with pytest.raises(ValueError, match="shape"):
        ewc.add_ewc_gradient(1.0, bad).init(params)


def test_replay_buffer_holds_the_fraction_deterministically():
    buffer = multitask.replay_indices(10_000, 0.02, seed=3)
    assert len(buffer) == 200 and len(np.unique(buffer)) == 200
    assert buffer.min() >= 0 and buffer.max() < 10_000
    np.testing.assert_array_equal(buffer, multitask.replay_indices(10_000, 0.02, seed=3))
    assert not np.array_equal(buffer, multitask.replay_indices(10_000, 0.02, seed=4))
    with pytest.raises(ValueError, match="replay_fraction"):
        multitask.replay_indices(100, 0.0, seed=0)


def test_replay_fills_its_share_of_the_mixture_and_resumes(tmp_path):
    """A phase's mixture: the new task plus buffers of two earlier ones at replay_share;
    its train iterator, restored from a saved state, yields the same batches."""
    from configs.common import base_config
    from train.data import pipeline
    from train.data.tokenizer import train_tokenizer

    words = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "zu", "pe"]
    rng = np.random.default_rng(0)
    base = [{"text": " ".join(rng.choice(words, 5)), "label": i % 45, "pos": "nvar"[i % 4],
             "lemmas": ["x"] * (1 + i % 3)} for i in range(1000)]
    parts = [multitask.LabelledTask(base, n, t)
             for t, n in enumerate(("supersense", "pos", "synset_size"))]
    share = 0.2
    current = multitask.slots(1000, 800, seed=0)
    fill = round(share / (1 - share) * 800 / 2)
    indices = [current]
    for t in (0, 1):
        buffer = multitask.replay_indices(1000, 0.05, seed=t)
        indices.append(buffer[multitask.slots(len(buffer), fill, seed=t)])
    mixture = multitask.Mixture([parts[2], parts[0], parts[1]], indices, 45)
    counts = mixture.task_counts()
    assert (counts["supersense"] + counts["pos"]) / len(mixture) == pytest.approx(share)
    # Only buffered examples are replayed.
    assert set(indices[1]) == set(multitask.replay_indices(1000, 0.05, seed=0))

    data = base_config().data
    data.update(batch_size=8, seq_len=12)
    tok = train_tokenizer([ex["text"] for ex in base], tmp_path / "tok.model",
                          vocab_size=60)
    split = multitask.SplitTaskLabels(45)
    first = pipeline.make_train_iterator(mixture, tok, data, seed=1,
                                         transform=lambda it: it.map(split))
    for _ in range(3):
        next(first)
    state = first.get_state()
    expected = [next(first) for _ in range(2)]
    resumed = pipeline.make_train_iterator(mixture, tok, data, seed=1,
                                           transform=lambda it: it.map(split))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in ("tokens", "labels", "task_ids"):
            np.testing.assert_array_equal(got[key], want[key])
