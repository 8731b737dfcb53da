"""The trainer's compiled step takes the seed as an argument: runs that differ only in
their seed compile the same program (one executable, one persistent-cache entry, for a
sweep's seeds), and the step is bitwise the one with the seed baked in."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from configs import finetune
from train import tasks
from train.steps import make_train_step
from train.trainer import build_trainer


def _config(seed):
    config = finetune.get_config("method=full,runlocal,size=tiny")
    config.seed = seed
    config.model.dropout = 0.1  # The seed reaches the step through dropout.
    return config


def _batch(config):
    rng = np.random.default_rng(0)
    rows, width = config.data.batch_size, 16
    return {"tokens": jnp.asarray(rng.integers(5, 200, (rows, width)), jnp.int32),
            "labels": jnp.asarray(rng.integers(0, 45, rows), jnp.int32),
            "example_weight": jnp.ones(rows, jnp.float32)}


def test_seeds_share_one_program_and_match_the_baked_in_step():
    trainers = {seed: build_trainer(_config(seed)) for seed in (0, 3)}
    batch = _batch(trainers[0].config)
    texts = {s: t.train_step.lower(t.abstract_state(), t.global_batch(batch)).as_text()
             for s, t in trainers.items()}
    assert texts[0] == texts[3]

    trainer = trainers[3]
    config, state = trainer.config, trainer.init_state(seed=0)
    objective = tasks.get_task(config.task).objective(config)
    step = functools.partial(make_train_step, trainer.model, trainer.setup.tx, objective,
                             schedule=trainer.setup.schedule, trainable=trainer.setup.trainable)
    seeded = jax.jit(step(seed=None))
    (got, got_metrics), (other, other_metrics) = (seeded(state, batch, np.int32(s))
                                                  for s in (3, 0))
    want, want_metrics = jax.jit(step(seed=3))(state, batch)
    # Another compile of the same computation: equal up to float rounding, and the
    # dropout masks are the same ones (other masks move the update far more).
    def gap(a, b):
        return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert gap(got, want) < 1e-6 and gap(got, other) > 100 * max(gap(got, want), 1e-9)
    assert abs(float(got_metrics["loss"]) - float(want_metrics["loss"])) < 1e-5
    assert float(got_metrics["loss"]) != float(other_metrics["loss"])
