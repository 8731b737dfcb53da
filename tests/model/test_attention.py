"""Attention masks against a loop-by-loop numpy reference, and the KV cache against the
full forward pass."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs.common import LOGICAL_AXIS_RULES, base_config, model_config
from model.attention import dot_product_attention, make_attention_mask
from model.transformer import Model, resolve
from train import partitioning
from train.config_checks import validate


def reference_mask(segment_ids, mode, prefix_mask=None):
    batch, seq = segment_ids.shape
    out = np.zeros((batch, 1, seq, seq), bool)
    for b in range(batch):
        for i in range(seq):
            for j in range(seq):
                same = segment_ids[b, i] == segment_ids[b, j] and segment_ids[b, j] != 0
                if mode == "bidirectional":
                    visible = True
                elif mode == "causal":
                    visible = j <= i
                else:  # prefix-LM: the prefix is visible to all, the rest causally.
                    visible = j <= i or prefix_mask[b, j]
                out[b, 0, i, j] = same and visible
    return out


# Two packed sequences then padding; and one sequence filling the row.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
PREFIX = np.array([[1, 1, 0, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]], bool)


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "prefix"])
def test_mask_matches_numpy_reference(mode):
    prefix = PREFIX if mode == "prefix" else None
    got = make_attention_mask(jnp.asarray(SEGMENTS), mode,
                              None if prefix is None else jnp.asarray(prefix))
    np.testing.assert_array_equal(np.asarray(got), reference_mask(SEGMENTS, mode, prefix))


def test_unknown_mask_mode_names_the_key():
    with pytest.raises(ValueError, match="config.model.attention_mask"):
        make_attention_mask(jnp.asarray(SEGMENTS), "sideways")


def test_attention_matches_numpy_softmax():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 7, 3, 4)).astype(np.float32) for _ in range(3))
    mask = reference_mask(SEGMENTS, "causal")
    got = dot_product_attention(q, k, v, jnp.asarray(mask))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(4)
    logits = np.where(mask, logits, -1e30)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights = weights / weights.sum(-1, keepdims=True)
    want = np.einsum("bhqk,bkhd->bqhd", weights, v)
    rows = SEGMENTS > 0  # Fully masked (padding) queries have no defined output.
    np.testing.assert_allclose(np.asarray(got)[rows], want[rows], rtol=1e-5, atol=1e-5)
    # The jax.nn implementation is the same computation.
    other = dot_product_attention(q, k, v, jnp.asarray(mask), impl="dot_product")
    np.testing.assert_allclose(np.asarray(other)[rows], want[rows], rtol=1e-5, atol=1e-5)


def tiny_model(**overrides):
    cfg = resolve(model_config("tiny", vocab_size=97, max_len=16, dropout=0.0,
                               attention_dropout=0.0, heads=("lm",), **overrides))
    return Model(cfg)


@pytest.mark.parametrize("mode", ["causal", "prefix", "bidirectional"])
def test_masks_decide_what_each_position_sees(mode):
    model = tiny_model(attention_mask=mode)
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 1, 97)
    prefix = jnp.arange(10)[None, :].repeat(2, 0) < 4
    params = model.init(jax.random.key(0), tokens, prefix_mask=prefix)
    changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % 97)  # Alter the tail only.

    def hidden(t):
        return model.apply(params, t, prefix_mask=prefix)["hidden"]

    same = np.isclose(hidden(tokens), hidden(changed), atol=1e-6).all(-1)
    if mode == "bidirectional":
        assert not same[:, :7].any()  # Every position sees the tail.
    elif mode == "causal":
        assert same[:, :7].all() and not same[:, 7:].all()
    else:
        assert same[:, :7].all()  # Prefix and earlier targets never see later tokens.
        changed_prefix = tokens.at[:, 3].set((tokens[:, 3] + 1) % 97)
        # ... but a prefix token is seen by all earlier prefix positions too.
        assert not np.isclose(hidden(tokens)[:, 0], hidden(changed_prefix)[:, 0]).all()


# PEFT: (IA)^3 scales keys before the cache; prefixes join after it (model/attention.py).
@pytest.mark.parametrize("norm, peft", [
    ("pre", {}), ("post", {}),
    ("pre", dict(ia3=True, prefix_length=3, lora_rank=2, adapter_dim=4))])
def test_kv_cache_decoding_equals_full_forward(norm, peft):
    model = tiny_model(attention_mask="causal", norm=norm, **peft)
    batch, max_len, prompt = 2, model.cfg.max_len, 5
    tokens = jax.random.randint(jax.random.key(2), (batch, max_len), 1, 97)
    params = model.init(jax.random.key(0), tokens)["params"]
    # Away from the identity init, so that the adapted keys/values matter.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if re.search("ia3|lora_b|adapter", str(path)) else x, params)
    full = model.apply({"params": params}, tokens)["lm"]

    cache = model.init(jax.random.key(0), tokens, decode=True)["cache"]
    key_positions = jnp.arange(max_len)

    def step(cache, chunk, start):
        positions = start + jnp.arange(chunk.shape[1])
        mask = key_positions[None, :] <= positions[:, None]  # [q, max_len]
        mask = jnp.broadcast_to(mask, (batch, 1, *mask.shape))
        out, updated = model.apply(
            {"params": params, "cache": cache}, chunk,
            positions=jnp.broadcast_to(positions, chunk.shape), attention_mask=mask,
            decode=True, mutable=["cache"])
        return out["lm"], updated["cache"]

    logits, cache = step(cache, tokens[:, :prompt], 0)  # Prefill the prompt at once.
    decoded = [logits]
    for t in range(prompt, max_len):
        logits, cache = step(cache, tokens[:, t:t + 1], t)
        decoded.append(logits)
    np.testing.assert_allclose(np.concatenate(decoded, 1), full, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_rematerialisation_keeps_outputs_and_gradients(remat):
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 1, 97)
    plain, recomputed = tiny_model(), tiny_model(remat=remat)
    params = plain.init(jax.random.key(0), tokens)["params"]

    def grads(model):
        return jax.grad(lambda p: model.apply({"params": p}, tokens)["lm"].sum())(params)

    for a, b in zip(jax.tree_util.tree_leaves(grads(plain)),
                    jax.tree_util.tree_leaves(grads(recomputed))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Attention kernels (config.model.attention_impl) against the einsum reference.
# ----------------------------------------------------------------------------------------

KERNEL_SEQ = 128  # Splash tiles in blocks of 128: the smallest length it takes.
# Two packed sequences then padding; one sequence filling the row.
KERNEL_SEGMENTS = np.array([[1] * 90 + [2] * 30 + [0] * 8, [1] * KERNEL_SEQ], np.int32)
ON_GPU = jax.default_backend() == "gpu"


def kernel_inputs(dtype=jnp.float32):
    rng = np.random.default_rng(5)
    return [jnp.asarray(rng.normal(size=(2, KERNEL_SEQ, 2, 8)), dtype) for _ in range(3)]


def attention_and_grads(impl, mode, inputs, **kwargs):
    """Output and d(loss)/d(q, k, v), the loss counting real (non-padding) queries only:
    padding queries' outputs are undefined (each kernel fills them differently)."""
    segments = jnp.asarray(KERNEL_SEGMENTS)
    mask = make_attention_mask(segments, mode)
    real = (segments > 0)[:, :, None, None]
    cotangent = jax.random.normal(jax.random.key(0), inputs[0].shape)

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, mask, impl=impl, segment_ids=segments,
                                    mask_mode=mode, dtype=q.dtype, **kwargs)
        return (out.astype(jnp.float32) * cotangent * real).sum(), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(*inputs)
    return np.asarray(out, np.float32) * np.asarray(real), [np.asarray(g, np.float32)
                                                            for g in grads]


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
@pytest.mark.parametrize("impl, kwargs", [
    ("dot_product", {}),
    ("splash", dict(interpret=True)),  # The Pallas interpreter: the TPU kernel on CPU.
    ("auto", {}),
    pytest.param("cudnn", {}, marks=pytest.mark.skipif(not ON_GPU, reason="cuDNN: GPU only")),
])
def test_kernel_matches_einsum_reference(impl, kwargs, mode):
    dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32  # cuDNN: 16-bit only.
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    inputs = kernel_inputs(dtype)
    want_out, want_grads = attention_and_grads("xla", mode, inputs)
    got_out, got_grads = attention_and_grads(impl, mode, inputs, **kwargs)
    np.testing.assert_allclose(got_out, want_out, rtol=tol, atol=tol)
    for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_splash_runs_per_shard_on_a_mesh():
    """Under a (data, fsdp, tensor) mesh splash runs in a shard_map over batch and heads;
    the result is the same attention."""
    mesh = partitioning.make_mesh(dict(data=2, fsdp=2, tensor=2))
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(rng.normal(size=(4, KERNEL_SEQ, 2, 8)), jnp.float32)
               for _ in range(3))
    segments = jnp.asarray(np.concatenate([KERNEL_SEGMENTS, KERNEL_SEGMENTS[::-1]]))
    mask = make_attention_mask(segments, "causal")
    real = np.asarray(segments > 0)

    def attend(impl, q, k, v):
        return dot_product_attention(q, k, v, mask, impl=impl, segment_ids=segments,
                                     mask_mode="causal", interpret=True)

    want = attend("xla", q, k, v)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        got = jax.jit(attend, static_argnums=0)("splash", q, k, v)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real],
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_kernel_off_its_platform_names_the_key_and_platform(impl):
    platform = jax.default_backend()
    if platform == {"splash": "tpu", "cudnn": "gpu"}[impl]:
        pytest.skip(f"{impl} runs here")
    model = tiny_model(attention_impl=impl)
    tokens = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=rf"attention_impl='{impl}'.*platform is '{platform}'"):
        model.init(jax.random.key(0), tokens)


@pytest.mark.parametrize("case, match", [
    (dict(mask_mode="prefix"), "attention_mask='prefix'"),
    (dict(segment_ids=None), "explicit attention mask"),
    (dict(deterministic=False, dropout_rate=0.1), "attention_dropout=0.1"),
    (dict(seq=64), "multiple of 128, got 64"),
])
def test_splash_refuses_what_it_cannot_express(case, match):
    case = dict(case)
    seq = case.pop("seq", KERNEL_SEQ)
    q = jnp.zeros((1, seq, 2, 8))
    segments = jnp.ones((1, seq), jnp.int32)
    args = dict(segment_ids=segments, mask_mode="causal", dropout_rng=jax.random.key(0))
    args.update(case)
    mask = make_attention_mask(segments, "causal")
    with pytest.raises(ValueError, match=rf"attention_impl='splash': .*{match}"):
        dot_product_attention(q, q, q, mask, impl="splash", interpret=True, **args)


def test_auto_falls_back_to_the_einsum_where_no_kernel_applies():
    # On CPU no kernel runs; anywhere, attention dropout in training rules them out.
    q, k, v = kernel_inputs()
    segments = jnp.asarray(KERNEL_SEGMENTS)
    mask = make_attention_mask(segments, "causal")
    args = dict(segment_ids=segments, mask_mode="causal", deterministic=False,
                dropout_rate=0.5, dropout_rng=jax.random.key(1))
    np.testing.assert_array_equal(dot_product_attention(q, k, v, mask, impl="auto", **args),
                                  dot_product_attention(q, k, v, mask, impl="xla", **args))


def test_config_checks_refuse_kernel_with_attention_dropout():
    config = base_config()
    config.model.attention_impl = "cudnn"
    with pytest.raises(ValueError, match="attention_impl='cudnn'.*attention_dropout=0.1"):
        validate(config)
    config.model.attention_dropout = 0.0
    validate(config)
    config.model.attention_impl = "splash"
    config.model.attention_mask = "prefix"
    with pytest.raises(ValueError, match="'splash' cannot express .*attention_mask='prefix'"):
        validate(config)
