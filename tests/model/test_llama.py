"""The Llama family's options in the shared transformer: grouped-query attention against
a numpy reference, RMSNorm, SwiGLU, no biases, an untied head; parameter shapes and
names; a few train steps lower the loss; every fine-tuning method of the table applies."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs.common import model_config
from model import finetune_methods
from model.attention import dot_product_attention
from model.transformer import Model, resolve
from train.param_rules import param_paths, trainable_mask

LLAMA = dict(norm_type="rmsnorm", mlp_activation="swiglu", num_kv_heads=2, use_bias=False,
             position_embedding="rope", rope_theta=100_000.0, attention_mask="causal",
             norm="pre", dropout=0.0, attention_dropout=0.0, heads=("lm",),
             type_vocab_size=0, layer_norm_eps=1e-5)


def llama(**overrides):
    cfg = resolve(model_config("tiny", vocab_size=50, max_len=32, **{**LLAMA, **overrides}))
    model = Model(cfg)
    params = nn.unbox(model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"])
    return model, params


def numpy_gqa(q, k, v, mask):
    """q [b, s, H, d], k/v [b, t, K, d]: query head h reads kv head h // (H / K)."""
    heads, kv_heads = q.shape[2], k.shape[2]
    out = np.zeros_like(q)
    for h in range(heads):
        kh = h // (heads // kv_heads)
        logits = np.einsum("bsd,btd->bst", q[:, :, h], k[:, :, kh]) / np.sqrt(q.shape[-1])
        logits = np.where(mask[:, 0], logits, -np.inf)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[:, :, h] = np.einsum("bst,btd->bsd", weights, v[:, :, kh])
    return out


@pytest.mark.parametrize("kv_heads", [1, 2, 6])
@pytest.mark.parametrize("impl", ["xla", "dot_product"])
def test_grouped_query_attention_matches_numpy(kv_heads, impl):
    rng = np.random.default_rng(kv_heads)
    q = rng.normal(size=(2, 5, 6, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, 5, kv_heads, 8)).astype(np.float32) for _ in range(2))
    mask = np.tril(np.ones((5, 5), bool))[None, None].repeat(2, 0)
    got = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                jnp.asarray(mask), impl=impl)
    np.testing.assert_allclose(np.asarray(got), numpy_gqa(q, k, v, mask), rtol=2e-5,
                               atol=2e-6)


def test_parameter_names_and_shapes():
    model, params = llama(tie_embeddings=False)
    paths = dict(zip(param_paths(params), jax.tree_util.tree_leaves(params)))
    block = "encoder/block_0"
    assert paths[f"{block}/attention/query/kernel"].shape == (64, 4, 16)
    assert paths[f"{block}/attention/key/kernel"].shape == (64, 2, 16)  # 2 kv heads.
    assert paths[f"{block}/attention/value/kernel"].shape == (64, 2, 16)
    assert paths[f"{block}/mlp/gate/kernel"].shape == (64, 128)
    assert paths[f"{block}/attention_norm/scale"].shape == (64,)
    assert paths["encoder/final_norm/scale"].shape == (64,)
    assert paths["lm_head/kernel"].shape == (64, 50)
    assert not [p for p in paths if p.endswith("/bias")]  # No biases, norms included.
    assert "encoder/position_embed/embedding" not in paths  # RoPE: no table.
    _, tied = llama()
    assert "lm_head" not in tied


def test_rmsnorm_and_swiglu_match_numpy():
    """The block's sub-layers against their formulas: RMSNorm (no mean subtraction) and
    wo(silu(gate(x)) * wi(x))."""
    model, params = llama(num_layers=1)
    x = np.random.default_rng(0).normal(size=(1, 3, 64)).astype(np.float32)
    block = params["encoder"]["block_0"]
    scale = np.asarray(block["mlp_norm"]["scale"]) + 0.5  # Away from ones.
    normed = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * scale
    got = nn.RMSNorm(epsilon=1e-5).apply({"params": {"scale": scale}}, x)
    np.testing.assert_allclose(np.asarray(got), normed, rtol=1e-5, atol=1e-6)
    mlp = block["mlp"]
    gate, up, down = (np.asarray(mlp[n]["kernel"]) for n in ("gate", "wi", "wo"))
    h = normed @ gate
    want = ((h / (1 + np.exp(-h))) * (normed @ up)) @ down
    from model.transformer import Mlp

    got = Mlp(model.cfg).apply({"params": mlp}, jnp.asarray(normed))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [{}, dict(tie_embeddings=False), dict(num_kv_heads=1)])
def test_a_few_steps_lower_the_next_token_loss(options):
    model, params = llama(**options)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 50, (4, 12)), jnp.int32)
    tx = optax.adam(3e-3)

    def loss_fn(p):
        logits = model.apply({"params": p}, tokens[:, :-1])["lm"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    state, losses = tx.init(params), []
    for _ in range(15):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 1.0, losses  # ln(50) = 3.9 at the start.


@pytest.mark.parametrize("name", [m for m in finetune_methods.METHODS if m != "linear_probe"])
def test_every_fine_tuning_method_applies_to_the_decoder(name):
    """Each method's model fields build on the Llama options and its rules train
    something but not everything (except full fine-tuning). A linear probe needs a
    classification head; BitFit needs biases, which Llama has none of: refused."""
    method = finetune_methods.get(name)
    model, params = llama(**method.model_fields())
    rules = method.param_rules(None, model.cfg.num_layers, head=False)
    if name == "bitfit":
        with pytest.raises(ValueError, match="bias.*matches no parameter"):
            trainable_mask(jax.eval_shape(lambda: params), rules)
        return
    mask = trainable_mask(jax.eval_shape(lambda: params), rules)
    flags = jax.tree_util.tree_leaves(mask)
    assert any(flags), name
    if method.whole_model:
        return
    assert not all(flags), name
    trained = [p for p, f in zip(param_paths(params), flags) if f]
    if method.params:
        import re

        assert any(re.fullmatch(method.params, p) for p in trained), (name, trained)
