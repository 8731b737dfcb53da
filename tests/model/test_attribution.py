"""Explanations: integrated gradients against analytic attributions and the completeness
axiom on the real transformer; attention rollout against a hand computation and a numpy
loop; the sown attention weights against numpy softmax(QK^T / sqrt(d)) of the params;
the default (unsown) path unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs.common import model_config
from model import attribution
from model.attention import dot_product_attention
from model.transformer import Model, resolve


def tiny_classifier(**overrides):
    cfg = model_config("tiny", heads=("classify",), num_classes=3, max_len=16, vocab_size=50,
                       dropout=0.0, attention_dropout=0.0, **overrides)
    model = Model(resolve(cfg))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))[
        "params"])
    # Perturb every parameter: at init biases are zero and LayerNorms the identity,
    # which would leave their terms untested.
    rng = np.random.default_rng(1)
    return model, jax.tree.map(
        lambda v: jnp.asarray(v + 0.2 * rng.normal(size=v.shape), jnp.float32), params)


@pytest.fixture(scope="module")
def classifier():
    return tiny_classifier()


TOKENS = np.array([2, 7, 9, 11, 30, 3], np.int32)


@pytest.mark.parametrize("method", ["left", "right", "midpoint", "trapezoid"])
def test_linear_model_gets_its_analytic_attribution(method):
    rng = np.random.default_rng(0)
    w, x, x0 = (rng.normal(size=(5, 3)).astype(np.float32) for _ in range(3))
    result = attribution.integrated_gradients(lambda v: jnp.sum(v * w) + 0.7, x, x0,
                                              steps=7, method=method, chunk=3)
    np.testing.assert_allclose(result.attributions, (x - x0) * w, rtol=1e-5, atol=1e-6)
    assert result.completeness_rel_error < 1e-5


def test_quadrature_rules_on_a_quadratic():
    """f = sum x^2: along the path the gradient is linear in alpha, so the trapezoid rule
    is exact (x^2 - x0^2) and the left rule is short by d^2 / m per coordinate."""
    x, x0 = np.array([1.0, -2.0, 0.5], np.float32), np.array([0.5, 1.0, 0.0], np.float32)
    d, m = x - x0, 4
    trapezoid = attribution.integrated_gradients(lambda v: jnp.sum(v ** 2), x, x0, steps=m)
    np.testing.assert_allclose(trapezoid.attributions, x ** 2 - x0 ** 2, rtol=1e-5)
    left = attribution.integrated_gradients(lambda v: jnp.sum(v ** 2), x, x0, steps=m,
                                            method="left")
    np.testing.assert_allclose(left.attributions, x ** 2 - x0 ** 2 - d ** 2 / m, rtol=1e-5)
    assert left.completeness_rel_error == pytest.approx(
        np.sum(d ** 2 / m) / abs(np.sum(x ** 2 - x0 ** 2)), rel=1e-4)


def test_bad_integrated_gradients_arguments_are_named():
    with pytest.raises(ValueError, match="method='simpson'"):
        attribution.quadrature(4, "simpson")
    with pytest.raises(ValueError, match="steps=0"):
        attribution.quadrature(0)
    with pytest.raises(ValueError, match="baseline shape"):
        attribution.integrated_gradients(jnp.sum, np.ones(3), np.ones(4))


def test_completeness_on_the_transformer(classifier):
    model, params = classifier
    logits = jax.jit(model.apply)({"params": params}, TOKENS[None])["classify"][0]
    fn, embeddings = attribution.embedding_logit_fn(model, params, TOKENS, target=2)
    # The embedding path is the model: the same logit from the looked-up embeddings.
    assert float(jax.jit(fn)(embeddings)) == pytest.approx(float(logits[2]), abs=1e-5)
    result = attribution.integrated_gradients(fn, embeddings, steps=64)
    assert result.value == pytest.approx(float(logits[2]), abs=1e-5)
    delta = result.value - result.baseline_value
    assert abs(delta) > 0.05  # A real logit difference to account for.
    assert result.attributions.sum() == pytest.approx(delta, rel=0.01)
    assert result.completeness_rel_error < 0.01
    # Two steps are a poor quadrature on this curved path: the check must notice.
    coarse = attribution.integrated_gradients(fn, embeddings, steps=1, method="left")
    assert coarse.completeness_rel_error > 10 * result.completeness_rel_error
    with pytest.raises(ValueError, match="raise --ig_steps"):
        attribution.check_completeness(coarse, tolerance=result.completeness_rel_error)
    attribution.check_completeness(result, tolerance=0.01)


def test_rollout_by_hand():
    # 2 layers, 1 head, 2 tokens. Mixed with identity (0.5 each):
    # L1 [[1, 0], [.25, .75]], L2 [[.6, .4], [0, 1]]; L2 @ L1 = [[.7, .3], [.25, .75]].
    attentions = np.array([[[[1.0, 0.0], [0.5, 0.5]]], [[[0.2, 0.8], [0.0, 1.0]]]])
    np.testing.assert_allclose(attribution.attention_rollout(attentions),
                               [[0.7, 0.3], [0.25, 0.75]], atol=1e-12)


def test_rollout_matches_a_numpy_loop():
    rng = np.random.default_rng(0)
    layers, heads, seq = 3, 4, 5
    attentions = rng.random((layers, heads, seq, seq))
    attentions /= attentions.sum(-1, keepdims=True)
    want = np.eye(seq)
    for layer in range(layers):  # Element by element: the heads' mean, then + identity.
        mixed = np.zeros((seq, seq))
        for i in range(seq):
            for j in range(seq):
                mixed[i, j] = 0.5 * float(i == j) + 0.5 * sum(
                    attentions[layer, h, i, j] for h in range(heads)) / heads
            mixed[i] /= mixed[i].sum()
        want = mixed @ want
    np.testing.assert_allclose(attribution.attention_rollout(attentions), want, atol=1e-12)
    got = attribution.attention_rollout(jnp.asarray(attentions, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    np.testing.assert_allclose(want.sum(-1), 1.0)
    with pytest.raises(ValueError, match=r"\[layers, heads, seq, seq\]"):
        attribution.attention_rollout(attentions[0])


def layer_norm(x, scale, bias, eps):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_sown_weights_are_numpy_softmax_of_the_params(classifier):
    model, params = classifier
    tokens = np.array([[2, 7, 9, 11, 3, 0], [2, 30, 3, 0, 0, 0]], np.int32)
    segment_ids = (tokens != 0).astype(np.int32)
    _, state = jax.jit(lambda t, s: model.apply({"params": params}, t, segment_ids=s,
                                                mutable=["intermediates"]))(tokens, segment_ids)
    sown = np.asarray(attribution.stack_attention(state["intermediates"]))
    assert sown.shape == (2, 2, 4, 6, 6)  # [layers, batch, heads, q, k].

    p = jax.tree.map(np.asarray, params)["encoder"]
    x = p["token_embed"]["embedding"][tokens] + p["position_embed"]["embedding"][:6][None]
    x = layer_norm(x, p["embed_norm"]["scale"], p["embed_norm"]["bias"], 1e-12)  # Post-LN.
    a = p["block_0"]["attention"]
    q = np.einsum("bse,ehd->bshd", x, a["query"]["kernel"]) + a["query"]["bias"]
    k = np.einsum("bse,ehd->bshd", x, a["key"]["kernel"]) + a["key"]["bias"]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    visible = (segment_ids[:, None, :] == segment_ids[:, :, None]) & (segment_ids[:, None] > 0)
    logits = np.where(visible[:, None], logits, -1e30)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    real = segment_ids[:, :, None].astype(bool)  # Padding query rows are undefined.
    np.testing.assert_allclose(np.where(real[:, None], sown[0], 0),
                               np.where(real[:, None], want, 0), atol=1e-5)
    assert np.all(sown[:, 1, :, :3, 3:] == 0)  # Real queries never see padding keys.
    np.testing.assert_allclose(sown.sum(-1), 1.0, atol=1e-5)


def test_sowing_is_opt_in_and_changes_no_output(classifier):
    model, params = classifier
    tokens = jnp.asarray(TOKENS[None])
    plain = jax.jit(lambda t: model.apply({"params": params}, t))(tokens)
    sown, state = jax.jit(lambda t: model.apply({"params": params}, t,
                                                mutable=["intermediates"]))(tokens)
    for head in plain:
        np.testing.assert_array_equal(np.asarray(plain[head]), np.asarray(sown[head]))
    assert "intermediates" in state
    # Off by default: the compiled forward pass holds one softmax (exp) per layer, the
    # opted-in one a second (the sown weights).
    def exps(**kw):
        jaxpr = jax.make_jaxpr(lambda t: model.apply({"params": params}, t, **kw))(tokens)
        return str(jaxpr).count(" exp ")
    assert exps() == 2 and exps(mutable=["intermediates"]) == 4


def test_einsum_attention_is_the_reference_formula_bitwise():
    """The einsum path now reads its weights from the function that sows them: its output
    is bitwise the formula it computed before (grouped-query included)."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, 5, 2, 8)).astype(np.float32) for _ in range(2))
    mask = jnp.asarray(np.tril(np.ones((5, 5), bool))[None, None].repeat(2, 0))

    def before(query, key, value):
        query = query / jnp.sqrt(8).astype(query.dtype)
        query = query.reshape(2, 5, 2, 2, 8)
        logits = jnp.einsum("bqhgd,bkhd->bhgqk", query, key).astype(jnp.float32)
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhgqk,bkhd->bhgqd", weights, value)
        return out.transpose(0, 3, 1, 2, 4).reshape(2, 5, 4, 8)

    got = jax.jit(lambda a, b, c: dot_product_attention(a, b, c, mask))(q, k, v)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(before)(q, k, v)))


def test_span_attention_mass_and_prefix_keys():
    rng = np.random.default_rng(1)
    attentions = rng.random((2, 3, 6, 6))
    attentions /= attentions.sum(-1, keepdims=True)
    mass, per_key = attribution.span_attention_mass(attentions, [4, 5], {"a": (0, 2),
                                                                         "b": (2, 5)})
    want = attentions[:, :, [4, 5]].mean(axis=(0, 1, 2))
    np.testing.assert_allclose(per_key, want)
    assert mass["a"] == pytest.approx(want[:2].sum())
    assert mass["b"] == pytest.approx(want[2:5].sum())

    # Prefix tuning's keys come first; stack_attention drops them and renormalises.
    weights = jnp.asarray(rng.random((1, 2, 4, 6)), jnp.float32)
    intermediates = {"encoder": {f"block_{i}": {"attention": {"attention_weights": (
        weights * (i + 1),)}} for i in range(2)}}
    stacked = np.asarray(attribution.stack_attention(intermediates))
    assert stacked.shape == (2, 1, 2, 4, 4)
    tail = np.asarray(weights)[..., 2:]
    np.testing.assert_allclose(stacked[1], tail / tail.sum(-1, keepdims=True), rtol=1e-5)


def test_completeness_over_pixels_on_a_vit():
    cfg = model_config("tiny", heads=("classify",), num_classes=3, vocab_size=1, max_len=5,
                       patch_size=2, image_shape=(4, 4, 1), norm="pre", dropout=0.0,
                       attention_dropout=0.0)
    model = Model(resolve(cfg))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))[
        "params"])
    image = np.random.default_rng(0).random((4, 4, 1)).astype(np.float32)
    image[0, 0] = 0.0  # Equal to the black baseline: no attribution possible.

    def fn(x):
        return model.apply({"params": params}, x[None])["classify"][0, 1]

    result = attribution.integrated_gradients(fn, image, steps=8, chunk=9)
    out, state = jax.jit(lambda x: model.apply({"params": params}, x,
                                               mutable=["intermediates"]))(image[None])
    assert result.value == pytest.approx(float(out["classify"][0, 1]), abs=1e-5)
    assert abs(result.value - result.baseline_value) > 1e-3
    assert result.completeness_rel_error < 0.01
    assert result.attributions[0, 0, 0] == 0.0
    sown = np.asarray(attribution.stack_attention(state["intermediates"]))
    assert sown.shape == (2, 1, 4, 5, 5)  # [CLS] + 4 patches.
    np.testing.assert_allclose(sown.sum(-1), 1.0, atol=1e-5)
