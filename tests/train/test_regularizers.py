"""Regularisation toward zero / the pre-trained weights: formula, SGD dynamics, frozen state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.common import base_config
from train import config_checks, regularizers
from train.optimizer import decays, make_optimizer


def tree(seed):
    rng = np.random.default_rng(seed)

    def draw(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return {"encoder": {"block_0": {"mlp": {"wi": {"kernel": draw(3, 4), "bias": draw(4)}},
                                    "mlp_norm": {"scale": draw(4)}}},
            "classify_head": {"out": {"kernel": draw(4, 2), "bias": draw(2)}}}


def flat(t):
    return {"/".join(str(k.key) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(t)[0]}


def reference(grads, params, anchor, l2, l1, toward):
    """numpy: g + l2 (θ - a) + l1 sign(θ - a); which leaves and which a, per the docs."""
    out = {}
    for name, g in flat(grads).items():
        theta = flat(params)[name]
        matrix = theta.ndim > 1 and not name.endswith("bias")
        if toward == "init" and not name.startswith("classify_head/"):
            diff = theta - flat(anchor)[name]  # Pre-trained: every leaf, to θ0.
        elif matrix:
            diff = theta  # Toward zero: matrices only (weight decay's leaves).
        else:
            out[name] = g
            continue
        out[name] = g + l2 * diff + l1 * np.sign(diff)
    return out


@pytest.mark.parametrize("toward", ["zero", "init"])
def test_gradient_matches_numpy_formula(toward):
    anchor, params, grads = tree(0), tree(1), tree(2)
    tx = regularizers.add_regularization_gradient(0.3, 0.05, toward, decayed=decays)
    state = tx.init(anchor)
    updates, _ = tx.update(grads, state, params)
    want = reference(grads, params, anchor, 0.3, 0.05, toward)
    got = flat(updates)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)
    if toward == "zero":
        assert state == optax.EmptyState()  # No anchor to store.


def test_only_regularisation_decays_geometrically_to_the_anchor():
    """Zero loss gradient, SGD: θ_t - θ0 = (1 - lr l2)^t (θ_0' - θ0) for L2; L1 moves
    |θ - θ0| down by lr l1 per step (until it would cross)."""
    lr, l2, steps = 0.1, 0.5, 20
    anchor, start = tree(0), tree(1)
    tx = optax.chain(regularizers.add_regularization_gradient(l2, 0.0, "init", decayed=decays),
                     optax.sgd(lr))
    state, params = tx.init(anchor), start
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    for _ in range(steps):
        updates, state = tx.update(zeros, state, params)
        params = optax.apply_updates(params, updates)
    factor = (1 - lr * l2) ** steps
    for name, theta in flat(params).items():
        if name.startswith("classify_head/"):  # Fresh: toward zero, kernel only.
            expected = factor * flat(start)[name] if name.endswith("kernel") else flat(start)[name]
        else:
            expected = flat(anchor)[name] + factor * (flat(start)[name] - flat(anchor)[name])
        np.testing.assert_allclose(theta, expected, rtol=1e-5, atol=1e-6, err_msg=name)

    l1, steps = 0.01, 5  # 5 * lr * l1 = 0.005 < every |θ - θ0| below, so no crossing.
    start = jax.tree_util.tree_map(lambda a: a + 0.1, anchor)
    tx = optax.chain(regularizers.add_regularization_gradient(0.0, l1, "init", decayed=decays),
                     optax.sgd(lr))
    state, params = tx.init(anchor), start
    for _ in range(steps):
        updates, state = tx.update(zeros, state, params)
        params = optax.apply_updates(params, updates)
    got = flat(params)["encoder/block_0/mlp/wi/kernel"]
    np.testing.assert_allclose(got - flat(anchor)["encoder/block_0/mlp/wi/kernel"],
                               0.1 - steps * lr * l1, rtol=1e-4)


def optim_config(**kw):
    c = base_config().optim
    c.update({"l2_strength": 0.1, "l1_strength": 0.0, "regularize_toward": "init", **kw})
    return c


def test_frozen_params_hold_no_anchor_and_stay_put():
    params = tree(0)
    cfg = optim_config(param_rules=((r"encoder/block_0/mlp/.*", 0.0),))
    tx, _ = make_optimizer(cfg, 10, params)
    state = tx.init(params)
    anchors = [s for s in jax.tree_util.tree_leaves(
        state, is_leaf=lambda x: isinstance(x, regularizers.AnchorState))
        if isinstance(s, regularizers.AnchorState)]
    assert len(anchors) == 1
    stored = flat(jax.tree_util.tree_map(lambda x: x, anchors[0].anchor))
    assert sorted(stored) == ["classify_head/out/bias", "classify_head/out/kernel",
                              "encoder/block_0/mlp_norm/scale"]  # Frozen mlp: no anchor.
    for name, value in stored.items():
        np.testing.assert_array_equal(value, flat(params)[name])
    updates, _ = tx.update(tree(2), state, tree(3))
    assert not flat(updates)["encoder/block_0/mlp/wi/kernel"].any()  # Frozen: zero update.
    # Without the regulariser the optimizer state is smaller by exactly the anchor.
    plain, _ = make_optimizer(optim_config(l2_strength=0.0, param_rules=cfg.param_rules), 10,
                              params)
    size = lambda s: sum(x.size for x in jax.tree_util.tree_leaves(s))  # noqa: E731
    assert size(state) - size(plain.init(params)) == 4 + 2 * 4 + 2


def test_reinit_on_loaded_params_moves_the_anchor_with_its_own_buffers():
    """What the loop does after init_from: tx.init on the loaded params, jitted."""
    tx, _ = make_optimizer(optim_config(), 10, tree(0))
    loaded = tree(5)
    state = jax.jit(tx.init)(loaded)
    anchor = next(s for s in jax.tree_util.tree_leaves(
        state, is_leaf=lambda x: isinstance(x, regularizers.AnchorState))
        if isinstance(s, regularizers.AnchorState)).anchor
    for a, p in zip(jax.tree_util.tree_leaves(anchor), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(a, p)
        assert a.unsafe_buffer_pointer() != p.unsafe_buffer_pointer()  # Both get donated.


@pytest.mark.parametrize("field,value,match", [
    ("l2_strength", -1.0, "config.optim.l2_strength=-1.0 must be >= 0"),
    ("l1_strength", -0.1, "config.optim.l1_strength=-0.1 must be >= 0"),
    ("regularize_toward", "pretrained", "config.optim.regularize_toward='pretrained'"),
])
def test_config_errors_name_the_key(field, value, match):
    config = base_config()
    config.optim[field] = value
    with pytest.raises(ValueError, match=match):
        config_checks.validate(config)


def test_toward_init_needs_init_from():
    config = base_config()
    config.optim.update(dict(l2_strength=0.01, regularize_toward="init"))
    with pytest.raises(ValueError, match="config.init_from is empty"):
        config_checks.validate(config)
    config.init_from = "runs/mlm"
    config_checks.validate(config)  # Now accepted.
