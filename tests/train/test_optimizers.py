"""Optimizers by name (config.optim.name, train/optimizer.py OPTIMIZERS): one step equals
optax's own optimizer on the trainable parameters, frozen ones stay bitwise unchanged
with no state, and the state's size is each optimizer's own."""

import jax
import numpy as np
import optax
import pytest

from configs import common
from train import optimizer

LR = 0.01


def optim_config(name, **fields):
    cfg = common.base_config().optim
    cfg.update(name=name, lr=LR, schedule="constant", warmup_steps=0, clip_norm=0.0,
               weight_decay=0.1, param_rules=(("head/.*", 0.0),), **fields)
    return cfg


def tree(seed, matrix=(4, 3)):
    keys = jax.random.split(jax.random.key(seed), 3)
    return {"encoder": {"kernel": jax.random.normal(keys[0], matrix),
                        "bias": jax.random.normal(keys[1], matrix[1:])},
            "head": {"kernel": jax.random.normal(keys[2], (matrix[1], 2))}}


def reference(name):
    """optax called directly, weight decay on matrices only."""
    def mask(params):
        return jax.tree.map(lambda p: p.ndim > 1, params)
    return {
        "adamw": optax.adamw(LR, weight_decay=0.1, mask=mask),
        "sgd": optax.chain(optax.add_decayed_weights(0.1, mask),
                           optax.sgd(LR, momentum=0.9, nesterov=True)),
        "adafactor": optax.adafactor(LR, weight_decay_rate=0.1, weight_decay_mask=mask),
        "lion": optax.lion(LR, b1=0.9, b2=0.99, weight_decay=0.1, mask=mask),
        "lamb": optax.lamb(LR, weight_decay=0.1, mask=mask),
    }[name]


@pytest.mark.parametrize("name", sorted(optimizer.OPTIMIZERS))
def test_two_steps_match_optax_and_frozen_parameters_never_move(name):
    cfg = optim_config(name, nesterov=True)
    params = tree(0)
    tx, _ = optimizer.make_optimizer(cfg, num_steps=10, params=params)
    ref = reference(name)
    state, ref_params = tx.init(params), params["encoder"]
    ref_state = ref.init(ref_params)
    for step in range(2):
        grads = tree(step + 1)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        ref_updates, ref_state = ref.update(grads["encoder"], ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, ref_updates)
    for key in ("kernel", "bias"):
        np.testing.assert_allclose(params["encoder"][key], ref_params[key], rtol=1e-6,
                                   atol=1e-7, err_msg=f"{name}: {key}")
    assert not np.allclose(params["encoder"]["kernel"], tree(0)["encoder"]["kernel"])
    np.testing.assert_array_equal(params["head"]["kernel"], tree(0)["head"]["kernel"])


def test_state_size_is_each_optimizers_own():
    params = tree(0, matrix=(256, 256))
    trainable = sum(x.size for x in jax.tree.leaves(params["encoder"])) * 4  # f32 bytes.

    def state_bytes(name, **fields):
        tx, _ = optimizer.make_optimizer(optim_config(name, **fields), 10, params)
        return optimizer.optimizer_state_bytes(tx.init(params)) / trainable

    assert state_bytes("adamw") == pytest.approx(2.0, abs=0.01)  # mu and nu.
    assert state_bytes("lamb") == pytest.approx(2.0, abs=0.01)
    assert state_bytes("lion") == pytest.approx(1.0, abs=0.01)  # One moment.
    assert state_bytes("sgd", momentum=0.9) == pytest.approx(1.0, abs=0.01)
    assert state_bytes("sgd", momentum=0.0) < 0.01  # Plain SGD: no state.
    # Adafactor: a 256 x 256 matrix keeps a row and a column vector (the bias, a vector,
    # keeps its full second moment).
    assert state_bytes("adafactor") < 0.02


def test_unknown_optimizer_and_nesterov_without_momentum_are_refused_by_key():
    with pytest.raises(ValueError, match=r"config.optim.name='adam'; expected one of"):
        optimizer.make_optimizer(optim_config("adam"), 10, tree(0))
    with pytest.raises(ValueError, match="config.optim.nesterov=True needs"):
        optimizer.make_optimizer(optim_config("sgd", nesterov=True, momentum=0.0), 10,
                                 tree(0))
