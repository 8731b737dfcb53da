"""Ordered regex rules decide, per parameter, frozen or trainable and its lr multiplier."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs.common import base_config, model_config
from train import model_setup, param_rules, tasks
from train.optimizer import make_optimizer, optimizer_state_bytes
from train.steps import TrainState, make_train_step

SEQ, BATCH, LAYERS = 16, 8, 3
BOTTOM = (r"encoder/(token_embed|position_embed|embed_norm)/.*", None)


def tiny_config(**optim):
    c = base_config()
    c.model = model_config("tiny", vocab_size=128, max_len=SEQ, num_classes=8,
                           num_layers=LAYERS, dropout=0.0, attention_dropout=0.0)
    c.data.seq_len = SEQ
    c.optim.update(dict(lr=1e-2, warmup_steps=0, schedule="constant", **optim))
    return c


@pytest.fixture(scope="module")
def model():
    return model_setup.build_model(tiny_config())


@pytest.fixture(scope="module")
def params(model):
    """Real (small) params; `jax.eval_shape` of them is the abstract tree."""
    tokens = jnp.zeros((1, SEQ), jnp.int32)
    return jax.jit(lambda k: nn.unbox(model.init(
        {"params": k}, tokens, heads=model.cfg.heads)["params"]))(jax.random.key(0))


def flat(tree):
    return dict(zip(param_rules.param_paths(tree), jax.tree_util.tree_leaves(tree)))


def test_default_everything_trainable_at_one(params):
    assert all(flat(param_rules.trainable_mask(params, ())).values())
    assert set(flat(param_rules.lr_multipliers(params, ())).values()) == {1.0}


def test_first_matching_rule_wins(params):
    rules = (("encoder/block_0/.*", 0.5), ("encoder/.*", None), ("encoder/block_1/.*", 2.0))
    mult = flat(param_rules.lr_multipliers(params, rules))
    mask = flat(param_rules.trainable_mask(params, rules))
    assert mult["encoder/block_0/mlp/wi/kernel"] == 0.5
    assert mult["encoder/block_1/mlp/wi/kernel"] == 0.0  # "encoder/.*" came first.
    assert not mask["encoder/block_1/mlp/wi/kernel"] and not mask["encoder/token_embed/embedding"]
    assert mask["encoder/block_0/mlp/wi/kernel"]
    assert mult["classify_head/classifier/kernel"] == 1.0  # No rule: trainable at 1.0.


def test_fullmatch_semantics(params):
    # A prefix is not enough: the regex must match the whole path.
    with pytest.raises(ValueError, match="matches no parameter"):
        param_rules.trainable_mask(params, (("encoder/block_0", None),))
    with pytest.raises(ValueError, match="matches no parameter"):
        param_rules.trainable_mask(params, (("block_0/.*", None),))  # re.search would match.
    mask = flat(param_rules.trainable_mask(params, ((r"encoder/block_\d+/.*/kernel", 0.0),)))
    assert not mask["encoder/block_2/attention/query/kernel"]
    assert mask["encoder/block_2/attention/query/bias"]


@pytest.mark.parametrize("frozen", [0.0, None, 0])
def test_zero_or_none_freezes(params, frozen):
    rules = (("classify_head/.*", frozen),)
    mask = flat(param_rules.trainable_mask(params, rules))
    assert [p for p, m in mask.items() if not m] == [
        "classify_head/classifier/bias", "classify_head/classifier/kernel",
        "classify_head/pooler/bias", "classify_head/pooler/kernel"]
    assert flat(param_rules.lr_multipliers(params, rules))["classify_head/pooler/bias"] == 0.0


def test_unmatched_rule_names_rule_and_real_paths(params):
    with pytest.raises(ValueError) as e:
        param_rules.trainable_mask(params, (("encoder/blocks_0/.*", None),))
    message = str(e.value)
    assert "'encoder/blocks_0/.*'" in message and "re.fullmatch" in message
    assert "encoder/block_0/attention/key/bias" in message


def test_bad_rules_rejected(params):
    with pytest.raises(ValueError, match="expected >= 0"):
        param_rules.lr_multipliers(params, (("encoder/.*", -1.0),))
    with pytest.raises(ValueError, match="not a .regex, multiplier. pair"):
        param_rules.lr_multipliers(params, ("encoder/.*",))
    with pytest.raises(ValueError, match="need make_optimizer"):
        make_optimizer(tiny_config(param_rules=(BOTTOM,)).optim, 10)


def test_layerwise_decay_is_electra_formula_times_rules(params):
    d, n = 0.8, LAYERS
    mult = flat(param_rules.lr_multipliers(params, (), d))
    for i in range(n):
        assert mult[f"encoder/block_{i}/mlp/wo/kernel"] == pytest.approx(d ** (n - i))
    for path in ("encoder/token_embed/embedding", "encoder/position_embed/embedding",
                 "encoder/embed_norm/scale"):
        assert mult[path] == pytest.approx(d ** (n + 1))
    assert mult["classify_head/classifier/kernel"] == 1.0
    assert param_rules.num_blocks(params) == n
    # Combined with regex rules: the product; a frozen rule stays frozen.
    mult = flat(param_rules.lr_multipliers(
        params, (("encoder/block_1/.*", 0.5), ("encoder/block_0/.*", None)), d))
    assert mult["encoder/block_1/attention/out/bias"] == pytest.approx(0.5 * d ** (n - 1))
    assert mult["encoder/block_0/attention/out/bias"] == 0.0


def test_counts(params):
    mask = param_rules.trainable_mask(params, (BOTTOM, ("encoder/block_0/.*", None)))
    sizes = {p: x.size for p, x in flat(params).items()}
    frozen = sum(s for p, s in sizes.items()
                 if p.startswith(("encoder/block_0/", "encoder/token_embed/",
                                  "encoder/position_embed/", "encoder/embed_norm/")))
    counts = model_setup.parameter_counts(jax.eval_shape(lambda: params), mask)
    assert counts["total"] == sum(sizes.values())
    assert counts["trainable"] == counts["total"] - frozen > 0
    assert model_setup.parameter_counts(params)["trainable"] == counts["total"]


def test_frozen_params_have_no_optimizer_state(model, params):
    abstract = jax.eval_shape(lambda: params)
    rules = (BOTTOM, ("encoder/block_0/.*", 0.0))
    frozen_tx, _ = make_optimizer(tiny_config(param_rules=rules).optim, 10, abstract)
    plain_tx, _ = make_optimizer(tiny_config().optim, 10)
    frozen_state = jax.eval_shape(frozen_tx.init, abstract)
    adam = [s for s in jax.tree_util.tree_leaves(
        frozen_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    mask = param_rules.trainable_mask(abstract, rules)
    for moments in (adam[0].mu, adam[0].nu):
        moments = moments["encoder"]
        assert isinstance(moments["token_embed"]["embedding"], optax.MaskedNode)
        assert not jax.tree_util.tree_leaves(moments["block_0"])  # All MaskedNodes.
        assert moments["block_1"]["mlp"]["wi"]["kernel"].shape == (64, 128)
    frozen_count = param_rules.trainable_count(abstract, jax.tree_util.tree_map(
        lambda m: not m, mask))
    assert frozen_count > 0
    saved = (optimizer_state_bytes(jax.eval_shape(plain_tx.init, abstract))
             - optimizer_state_bytes(frozen_state))
    assert saved == frozen_count * 2 * 4  # Adam mu and nu, float32.
    # The boxed abstract state (what shardings are built from) is consistent too.
    boxed, unboxed = model_setup.abstract_train_state(model, frozen_tx, SEQ)
    assert optimizer_state_bytes(unboxed.opt_state) == optimizer_state_bytes(frozen_state)
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    shardings = model_setup.state_shardings(boxed, mesh, tiny_config().logical_axis_rules)
    assert (jax.tree_util.tree_structure(shardings.opt_state)
            == jax.tree_util.tree_structure(unboxed.opt_state))


def synthetic_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 128, (BATCH, SEQ)).astype(np.int32)
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens),
            "labels": tokens[:, 0] % 8, "example_weight": np.ones(BATCH, np.float32)}


def test_frozen_bitwise_unchanged_after_real_steps(model, params):
    rules = (BOTTOM, ("encoder/block_0/.*", None), ("encoder/block_1/.*", 0.5))
    config = tiny_config(param_rules=rules)
    abstract = jax.eval_shape(lambda: params)
    tx, schedule = make_optimizer(config.optim, 3, abstract)
    mask = param_rules.trainable_mask(abstract, rules)
    step = jax.jit(make_train_step(model, tx, tasks.get_task(config.task).objective(config), seed=0,
                                   schedule=schedule, trainable=mask))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=tx.init(params))
    losses = []
    for _ in range(3):
        state, metrics = step(state, synthetic_batch())
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    before, after = flat(params), flat(state.params)
    for path, is_trainable in flat(mask).items():
        same = np.array_equal(np.asarray(before[path]).view(np.uint32),
                              np.asarray(after[path]).view(np.uint32))
        assert same != is_trainable, path


def small_params():
    rng = np.random.default_rng(0)
    return {"encoder": {"block_0": {"kernel": rng.normal(size=(8, 16)).astype(np.float32),
                                    "bias": np.zeros(16, np.float32)},
                        "block_1": {"kernel": rng.normal(size=(16, 8)).astype(np.float32)}},
            "head": {"kernel": rng.normal(size=(8, 4)).astype(np.float32)}}


def first_update(optim, params, grads):
    tx, _ = make_optimizer(optim, 10, jax.eval_shape(lambda: params))
    return flat(tx.update(grads, tx.init(params), params)[0])


def test_half_multiplier_gives_half_first_update():
    params = small_params()
    grads = jax.tree_util.tree_map(
        lambda p: np.random.default_rng(p.size).normal(size=p.shape).astype(np.float32),
        params)
    options = dict(weight_decay=0.0, clip_norm=0.0)
    full = first_update(tiny_config(**options).optim, params, grads)
    half = first_update(tiny_config(param_rules=(("encoder/block_1/.*", 0.5),),
                                    **options).optim, params, grads)
    for path, update in full.items():
        expected = update * 0.5 if path.startswith("encoder/block_1/") else update
        np.testing.assert_array_equal(half[path], expected)
    # First Adam step: update = -lr * g / (|g| + eps), i.e. ~ -lr * sign(g).
    np.testing.assert_allclose(full["head/kernel"], -1e-2 * np.sign(grads["head"]["kernel"]),
                               rtol=1e-5)


def test_frozen_update_is_zero_and_clipping_ignores_frozen():
    params = small_params()
    grads = jax.tree_util.tree_map(lambda p: np.full(p.shape, 0.1, np.float32), params)
    huge = {**grads, "head": {"kernel": np.full((8, 4), 1e6, np.float32)}}
    optim = tiny_config(param_rules=(("head/.*", None),), clip_norm=0.01).optim
    clipped, clipped_huge = first_update(optim, params, grads), first_update(optim, params, huge)
    assert not np.any(clipped_huge["head/kernel"])  # Exactly zero.
    for path in clipped:
        np.testing.assert_array_equal(clipped[path], clipped_huge[path])
