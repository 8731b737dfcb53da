"""Gradual unfreezing: the head trains first, then one block per phase from the top."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs.common import base_config, model_config
from train import model_setup, param_rules, tasks
from train.steps import TrainState, make_train_step
from train.unfreezing import gradual_unfreezing, unfreeze_phase, unfreeze_steps

SEQ, BATCH, LAYERS, EVERY = 16, 8, 2, 2


def config(every=EVERY, rules=()):
    c = base_config()
    c.model = model_config("tiny", vocab_size=64, max_len=SEQ, num_classes=4,
                           num_layers=LAYERS, dropout=0.0, attention_dropout=0.0)
    c.data.seq_len = SEQ
    c.train.num_steps = 10
    c.optim.update(dict(lr=1e-2, warmup_steps=0, schedule="constant",
                        gradual_unfreeze_every=every, param_rules=rules))
    return c


def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 64, (BATCH, SEQ)).astype(np.int32)
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens),
            "labels": tokens[:, 1] % 4, "example_weight": np.ones(BATCH, np.float32)}


def run_steps(c, num_steps):
    """-> params after each step, as {path: np.ndarray}, including the initial ones."""
    model = model_setup.build_model(c)
    tx, schedule, trainable = model_setup.build_optimizer(c, model)
    params = jax.jit(lambda k: nn.unbox(model.init(
        {"params": k}, jnp.zeros((1, SEQ), jnp.int32), heads=model.cfg.heads)["params"]))(
        jax.random.key(0))
    step = jax.jit(make_train_step(model, tx, tasks.get_task(c.task).objective(c), seed=0,
                                   schedule=schedule, trainable=trainable))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=tx.init(params))
    history = [param_rules.param_paths(params)]
    snapshots = [dict(zip(history[0], map(np.asarray, jax.tree_util.tree_leaves(params))))]
    for _ in range(num_steps):
        state, _ = step(state, batch())
        snapshots.append(dict(zip(history[0],
                                  map(np.asarray, jax.tree_util.tree_leaves(state.params)))))
    return snapshots


def test_phases_follow_the_ulmfit_order():
    assert unfreeze_phase("classify_head/classifier/kernel", 2) == 0
    assert unfreeze_phase("encoder/block_1/mlp/wi/kernel", 2) == 1
    assert unfreeze_phase("encoder/block_0/attention/query/kernel", 2) == 2
    assert unfreeze_phase("encoder/token_embed/embedding", 2) == 3
    assert unfreeze_phase("encoder/block_0/attention/query/lora_a", 2) == 2


def test_each_module_starts_to_change_at_its_step():
    # A rule freezes the token embedding: it must never unfreeze (rules win).
    c = config(rules=((r"encoder/token_embed/.*", 0.0),))
    snapshots = run_steps(c, 8)
    model = model_setup.build_model(c)
    starts = unfreeze_steps(model_setup.abstract_params(model, SEQ), EVERY)
    assert starts == {"classify_head": 0, "encoder/block_1": 2, "encoder/block_0": 4,
                      "encoder/token_embed": 6, "encoder/position_embed": 6,
                      "encoder/embed_norm": 6}
    for path in snapshots[0]:
        names = path.split("/")
        module = "/".join(names[:2]) if names[0] == "encoder" else names[0]
        changed = [not np.array_equal(snapshots[i][path], snapshots[i + 1][path])
                   for i in range(8)]
        # Step i (0-based) updates exactly the modules unfrozen at or before it. Biases and
        # norms all get nonzero gradients here, so "trains" means "changes".
        frozen = module == "encoder/token_embed"
        assert changed == [not frozen and i >= starts[module] for i in range(8)], (path,
                                                                                   changed)


def test_off_is_the_plain_optimizer():
    c = config(every=0)
    model = model_setup.build_model(c)
    params = model_setup.abstract_params(model, SEQ)
    inner = optax.adam(1e-3)
    assert gradual_unfreezing(inner, 0, params) is inner


def test_negative_every_is_refused():
    model = model_setup.build_model(config())
    with pytest.raises(ValueError, match="gradual_unfreeze_every"):
        gradual_unfreezing(optax.adam(1e-3), -1, model_setup.abstract_params(model, SEQ))
