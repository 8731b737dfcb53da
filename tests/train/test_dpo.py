"""DPO (task "dpo", train/post_training/): the loss against numpy, log 2 at step 0 with
the adapter-off reference, one update step preferring the chosen answers, and pairs
whose chosen and rejected texts are identical refused naming the file and line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import config_checks, model_setup
from train.data import pipeline
from train.post_training import dpo, rollout
from train.post_training import run as post_run


def toy_config(tmp_path):
    from tests.train.test_grpo import toy_setup

    config = toy_setup(tmp_path, task="dpo", method="lora")
    config.data.batch_size = 4  # Pairs: 8 rows over the 8 test devices.
    return config


def test_dpo_loss_matches_numpy():
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(-10, 3, 16).astype(np.float32) for _ in range(4))
    weights = (rng.random(16) < 0.8).astype(np.float32)
    beta = 0.3
    loss, metrics = dpo.dpo_loss(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), beta,
                                 jnp.asarray(weights))
    margin = beta * ((pc - rc) - (pr - rr))
    want = np.sum(np.log1p(np.exp(-margin)) * weights) / weights.sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reward_accuracy"]),
                               np.sum((margin > 0) * weights) / weights.sum(), rtol=1e-6)


def test_dpo_starts_at_log_2_and_one_step_prefers_the_chosen(tmp_path):
    config = toy_config(tmp_path)
    config.optim.lr = 0.1
    config_checks.validate(config)
    pt = post_run.build(config, post_run.dpo_objective)
    state = model_setup.init_train_state(pt.model, pt.setup.tx, 32, 0, pt.shardings)
    # Pairs: chosen "yes", rejected "no" after two prompts; rows alternate.
    batch = rollout.update_batch([[2, 11, 6, 3]] * 4 + [[2, 11, 7, 3]] * 4,
                                 [[5, 3], [6, 3]] * 4, 16, 0)
    global_batch = pipeline.to_global_batch(batch, pt.mesh)
    with jax.set_mesh(pt.mesh):
        state, first = pt.update(state, None, global_batch)
        state, second = pt.update(state, None, global_batch)  # The loss after one step.
    np.testing.assert_allclose(float(first["loss"]), np.log(2.0), rtol=1e-6)  # π = π_ref.
    assert abs(float(first["margin"])) < 1e-6
    # Measured: 0.69315 -> 0.69268 after one step (B starts at 0: a small first move).
    assert float(second["loss"]) < np.log(2.0) - 2e-4 and float(second["margin"]) > 0
    assert float(second["reward_accuracy"]) == 1.0
    trained = jax.tree.leaves(pt.setup.trainable)
    assert any(trained) and not all(trained)  # Only the adapter trains.


def test_identical_chosen_and_rejected_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"question": "q1", "chosen": "dog", "rejected": "cat"},
            {"question": "q2", "chosen": "dog", "rejected": " dog "}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf"{path} line 2: 'chosen' and 'rejected'"):
        post_run.read_pairs(str(path))
    path.write_text(json.dumps({"question": "q", "chosen": "dog"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: no 'rejected'"):
        post_run.read_pairs(str(path))


def test_dpo_beta_must_be_positive(tmp_path):
    config = toy_config(tmp_path)
    config.post_train.dpo_beta = 0.0
    with pytest.raises(ValueError, match=r"config\.post_train\.dpo_beta=0\.0"):
        config_checks.validate(config)
    config.post_train.dpo_beta = 0.1
    config.post_train.updates_per_rollout = 2  # GRPO's μ: DPO would silently ignore it.
    with pytest.raises(ValueError, match=r"config\.post_train\.updates_per_rollout=2 with"):
        config_checks.validate(config)
