"""The compiled train step gives the same loss trajectory on 1 device and on 8 fake
devices with data, fsdp and tensor parallelism; gradient accumulation matches too."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from configs.common import LOGICAL_AXIS_RULES, base_config, model_config
from train import model_setup, partitioning, tasks
from train.data.pipeline import to_global_batch
from train.optimizer import make_optimizer
from train.steps import make_train_step

STEPS, BATCH, SEQ = 6, 16, 16


def tiny_config(**optim):
    c = base_config()
    c.model = model_config("tiny", vocab_size=128, max_len=SEQ, num_classes=8)
    c.data.seq_len = SEQ
    c.optim.update(dict(lr=1e-2, warmup_steps=1, **optim))
    c.train.num_steps = STEPS
    return c


def synthetic_batches(seed=0):
    """Two batches in turn, labels a function of the first token: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(2):
        lengths = rng.integers(4, SEQ + 1, BATCH)
        segment_ids = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
        tokens = rng.integers(4, 128, (BATCH, SEQ)).astype(np.int32) * segment_ids
        batches.append({
            "tokens": tokens,
            "segment_ids": segment_ids,
            "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
            "labels": tokens[:, 0] % 8,
            "example_weight": np.ones(BATCH, np.float32),
        })
    return [batches[i % 2] for i in range(STEPS)]


def loss_trajectory(config, devices):
    mesh = partitioning.make_mesh(config.mesh, devices)
    rules = LOGICAL_AXIS_RULES
    model = model_setup.build_model(config)
    tx, schedule = make_optimizer(config.optim, STEPS)
    objective = tasks.get_task(config.task).objective(config)
    boxed, _ = model_setup.abstract_train_state(model, tx, SEQ)
    shardings = model_setup.state_shardings(boxed, mesh, rules)
    state = model_setup.init_train_state(model, tx, SEQ, 0, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(make_train_step(model, tx, objective, seed=0, schedule=schedule,
                                       grad_accum_steps=config.optim.grad_accum_steps),
                       in_shardings=(shardings, partitioning.batch_sharding(mesh)),
                       out_shardings=(shardings, partitioning.replicated(mesh)),
                       donate_argnums=(0,))
        losses = []
        for batch in synthetic_batches():
            state, metrics = step(state, to_global_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def single_device():
    config = tiny_config()
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    return loss_trajectory(config, jax.devices()[:1])


def test_loss_falls(single_device):
    losses, _ = single_device
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("mesh", [
    dict(data=8, fsdp=1, tensor=1),
    dict(data=1, fsdp=8, tensor=1),
    dict(data=2, fsdp=1, tensor=4),
    dict(data=2, fsdp=2, tensor=2),
])
def test_eight_devices_match_one(single_device, mesh):
    assert len(jax.devices()) == 8, "conftest.py should give 8 fake CPU devices"
    config = tiny_config()
    config.mesh.update(mesh)
    losses, state = loss_trajectory(config, jax.devices())
    np.testing.assert_allclose(losses, single_device[0], rtol=2e-4, atol=2e-5)
    kernel = state.params["encoder"]["block_0"]["mlp"]["wi"]["kernel"]
    # The parameters really are split across devices as the rules say.
    expected_shards = mesh["fsdp"] * mesh["tensor"]
    shards = {tuple((i.start, i.stop) for i in s.index) for s in kernel.addressable_shards}
    assert len(shards) == expected_shards


def test_gradient_accumulation_matches_full_batch():
    """Dropout off: 4 micro-batches give the full batch's gradient, so the same losses."""
    config = tiny_config()
    config.model.dropout = config.model.attention_dropout = 0.0
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    full, _ = loss_trajectory(config, jax.devices()[:1])
    config.optim.grad_accum_steps = 4
    accumulated, _ = loss_trajectory(config, jax.devices()[:1])
    np.testing.assert_allclose(accumulated, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mesh, message", [
    (dict(data=3, fsdp=1, tensor=1), "does not divide the 8 devices"),
    (dict(data=-1, fsdp=-1, tensor=1), "only one axis may be -1"),
    (dict(data=2, fsdp=2, tensor=1), "uses 4 devices but 8 are available"),
])
def test_bad_mesh_names_the_problem(mesh, message):
    with pytest.raises(ValueError, match=message):
        partitioning.make_mesh(mesh, jax.devices())


def test_batch_not_divisible_by_mesh():
    mesh = partitioning.make_mesh(dict(data=8, fsdp=1, tensor=1), jax.devices())
    with pytest.raises(ValueError, match="config.data.batch_size=12"):
        partitioning.check_batch_divides(12, mesh)
