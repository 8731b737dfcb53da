"""Attention masks and multi-head attention with an optional KV cache.

Masks are pure functions of segment ids (0 = padding; packed rows carry one id per
sequence) so packing, padding and the three modes share one code path.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from model import initializers

MASK_MODES = ("bidirectional", "causal", "prefix")


def make_attention_mask(segment_ids, mode="bidirectional", prefix_mask=None):
    """Which keys each query may attend to.

    Args:
      segment_ids: int [batch, seq]; 0 marks padding, equal ids share a sequence.
      mode: "bidirectional" (BERT), "causal" (GPT) or "prefix" (prefix-LM: the prefix
        attends bidirectionally within itself, the rest causally).
      prefix_mask: bool [batch, seq], True on prefix tokens; required for "prefix".
    Returns:
      bool [batch, 1, seq, seq]: True where query i may attend to key j.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"config.model.attention_mask={mode!r}; expected one of {MASK_MODES}")
    q_seg, k_seg = segment_ids[:, :, None], segment_ids[:, None, :]
    allowed = (q_seg == k_seg) & (k_seg != 0)
    if mode != "bidirectional":
        seq = segment_ids.shape[1]
        causal = jnp.arange(seq)[:, None] >= jnp.arange(seq)[None, :]
        if mode == "prefix":
            if prefix_mask is None:
                raise ValueError("attention_mask='prefix' needs a prefix_mask [batch, seq]")
            # Prefix keys are visible to every query of their sequence; target keys
            # only causally, so the prefix never sees the targets.
            causal = causal[None] | prefix_mask[:, None, :]
        allowed = allowed & causal
    return allowed[:, None, :, :]


def dot_product_attention(query, key, value, mask, *, dropout_rng=None, dropout_rate=0.0,
                          deterministic=True, dtype=jnp.float32, impl="xla"):
    """Scaled dot-product attention; softmax in float32.

    query [batch, q_len, heads, head_dim], key/value [batch, k_len, heads, head_dim],
    mask bool [batch, 1, q_len, k_len]. Returns [batch, q_len, heads, head_dim].
    """
    use_dropout = not deterministic and dropout_rate > 0.0
    if impl == "dot_product" and not use_dropout:
        # jax.nn picks the cuDNN flash kernel on GPU where it applies.
        return jax.nn.dot_product_attention(query, key, value, mask=mask).astype(dtype)
    if impl not in ("xla", "dot_product"):
        raise ValueError(f"config.model.attention_impl={impl!r}; expected 'xla' or 'dot_product'")
    depth = query.shape[-1]
    query = query / jnp.sqrt(depth).astype(query.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if use_dropout:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = weights * keep / (1.0 - dropout_rate)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), value)


class Linear(nn.Module):
    """x [..., *in_shape] -> [..., *features] with a kernel [*in_shape, *features].

    Unlike nn.DenseGeneral, the kernel keeps its multi-axis shape all the way through
    init, so its logical axis names (and sharding constraints) apply to the real array.
    """

    features: tuple
    logical_axes: tuple  # Names for the kernel's axes; the bias takes the last ones.
    in_ndim: int = 1
    init: str = "truncated_normal"
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[-self.in_ndim:]
        kernel = self.param(
            "kernel", initializers.kernel(self.init, self.init_std, self.logical_axes,
                                          self.in_ndim),
            (*in_shape, *self.features), self.param_dtype)
        bias = self.param("bias", initializers.zeros(self.logical_axes[self.in_ndim:]),
                          self.features, self.param_dtype)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        contract = tuple(range(x.ndim - self.in_ndim, x.ndim))
        y = jax.lax.dot_general(x, kernel, ((contract, tuple(range(self.in_ndim))), ((), ())))
        return y + bias


class MultiHeadAttention(nn.Module):
    """Self-attention over [batch, seq, embed]; `decode=True` uses a KV cache.

    Cache variables live in the "cache" collection: keys/values [batch, max_len, heads,
    head_dim] and the write index. The caller passes the mask for the whole cache
    ([batch, 1, q_len, max_len]) when decoding.
    """

    num_heads: int
    head_dim: int
    max_len: int
    init: str = "truncated_normal"
    init_std: float = 0.02
    dropout_rate: float = 0.0
    impl: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, *, deterministic=True, decode=False):
        embed = x.shape[-1]

        def projection(name):
            return Linear((self.num_heads, self.head_dim), ("embed", "heads", "kv"),
                          init=self.init, init_std=self.init_std, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)(x)

        query, key, value = projection("query"), projection("key"), projection("value")
        axes = ("activation_batch", "activation_length", "activation_heads", "kv")
        query = nn.with_logical_constraint(query, axes)
        key = nn.with_logical_constraint(key, axes)
        value = nn.with_logical_constraint(value, axes)
        key, value = self.adapt_key_value(key, value)

        if decode:
            key, value = self._update_cache(key, value)

        dropout_rng = None
        if not deterministic and self.dropout_rate > 0:
            dropout_rng = self.make_rng("dropout")
        out = dot_product_attention(
            query, key, value, mask, dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
            deterministic=deterministic, dtype=self.dtype, impl=self.impl,
        )
        out = nn.with_logical_constraint(out, axes)
        return Linear((embed,), ("heads", "kv", "embed"), in_ndim=2, init=self.init,
                      init_std=self.init_std, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="out")(out)

    def adapt_key_value(self, key, value):
        """Hook for methods that rescale or extend keys/values (PEFT); identity here."""
        return key, value

    def _update_cache(self, key, value):
        batch = key.shape[0]
        shape = (batch, self.max_len, self.num_heads, self.head_dim)
        initialised = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        if not initialised:  # The init pass only creates the cache.
            return key, value
        start = (0, index.value, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
        index.value = index.value + key.shape[1]
        return cached_key.value, cached_value.value
