"""Attention masks and multi-head attention with an optional KV cache.

Masks are pure functions of segment ids (0 = padding; packed rows carry one id per
sequence) so packing, padding and the three modes share one code path.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from model import initializers
from model.lora import LoraSpec

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
    lora: LoraSpec | None = None  # Adds a low-rank update (model/lora.py) when set.

    @nn.compact
    def __call__(self, x, deterministic=True):
        in_shape = x.shape[-self.in_ndim:]
        kernel = self.param(
            "kernel", initializers.kernel(self.init, self.init_std, self.logical_axes,
                                          self.in_ndim),
            (*in_shape, *self.features), self.param_dtype)
        bias = self.param("bias", initializers.zeros(self.logical_axes[self.in_ndim:]),
                          self.features, self.param_dtype)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        y = _contract(x, kernel, self.in_ndim) + bias
        if self.lora is not None:
            y = y + self._lora_update(x, in_shape, deterministic)
        return y

    def _lora_update(self, x, in_shape, deterministic):
        """(alpha / r) * dropout(x) @ A @ B: A [*in, r], B [r, *features] (zeros at init).

        The new axis r is unnamed (None: replicated); A keeps the kernel's input axis names
        and B its output names, so they shard like the kernel they update.
        """
        lora, n = self.lora, self.in_ndim
        a = self.param("lora_a", initializers.lora_a(n, (*self.logical_axes[:n], None)),
                       (*in_shape, lora.rank), self.param_dtype)
        b = self.param("lora_b", initializers.zeros((None, *self.logical_axes[n:])),
                       (lora.rank, *self.features), self.param_dtype)
        x = nn.Dropout(lora.dropout)(x, deterministic=deterministic)
        low = _contract(x, a.astype(self.dtype), n)  # [..., r]
        return lora.scale * _contract(low, b.astype(self.dtype), 1)


def _contract(x, kernel, in_ndim):
    """x [..., *in] . kernel [*in, *out] -> [..., *out] over the last `in_ndim` axes of x."""
    contract = tuple(range(x.ndim - in_ndim, x.ndim))
    return jax.lax.dot_general(x, kernel, ((contract, tuple(range(in_ndim))), ((), ())))


class MultiHeadAttention(nn.Module):
    """Self-attention over [batch, seq, embed]; `decode=True` uses a KV cache.

    Cache variables live in the "cache" collection: keys/values [batch, max_len, heads,
    head_dim] and the write index. The caller passes the mask for the whole cache
    ([batch, 1, q_len, max_len]) when decoding. A caller may pass a shorter cache (the
    slots it will write; model/decoding.py does): its length is whatever it is given.
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
    lora: LoraSpec | None = None  # LoRA on the projections its `targets` name.
    ia3: bool = False  # (IA)^3: learned per-channel scales of keys and values.
    prefix_length: int = 0  # Prefix tuning: learned keys/values every query attends to.

    @nn.compact
    def __call__(self, x, mask, *, deterministic=True, decode=False, prefix_kv=None):
        """`prefix_kv`: (keys, values) [prefix_length, heads, head_dim] made outside (the
        prefix-tuning MLP reparameterisation) instead of this layer's own prefix params."""
        embed = x.shape[-1]

        def projection(name):
            return Linear((self.num_heads, self.head_dim), ("embed", "heads", "kv"),
                          init=self.init, init_std=self.init_std, dtype=self.dtype,
                          param_dtype=self.param_dtype, lora=self._lora(name),
                          name=name)(x, deterministic)

        query, key, value = projection("query"), projection("key"), projection("value")
        axes = ("activation_batch", "activation_length", "activation_heads", "kv")
        query = nn.with_logical_constraint(query, axes)
        key = nn.with_logical_constraint(key, axes)
        value = nn.with_logical_constraint(value, axes)
        key, value = self.adapt_key_value(key, value)

        if decode:
            key, value = self._update_cache(key, value)
        if self.prefix_length:  # After the cache: the cache holds real tokens only.
            key, value, mask = self._prepend_prefix(key, value, mask, prefix_kv)

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
                      param_dtype=self.param_dtype, lora=self._lora("out"),
                      name="out")(out, deterministic)

    def _lora(self, name):
        return self.lora.for_projection(name) if self.lora is not None else None

    def adapt_key_value(self, key, value):
        """Hook for methods that rescale or extend keys/values (PEFT).

        (IA)^3 (Liu et al. 2022): key, value [batch, seq, heads, head_dim] times learned
        `ia3_key`, `ia3_value` [heads, head_dim], initialised to one (step 0 = base model).
        Applied before the KV cache, so cached keys are already scaled.
        """
        if self.ia3:
            key = key * self._ia3_scale("ia3_key").astype(key.dtype)
            value = value * self._ia3_scale("ia3_value").astype(value.dtype)
        return key, value

    def _ia3_scale(self, name):
        return self.param(name, initializers.ones(("heads", "kv")),
                          (self.num_heads, self.head_dim), self.param_dtype)

    def _prepend_prefix(self, key, value, mask, prefix_kv=None):
        """Prefix tuning (Li & Liang 2021): p learned `prefix_key`, `prefix_value`
        [p, heads, head_dim] before the keys/values [batch, k_len, ...], visible to every
        query: mask [batch, 1, q_len, k_len] -> [batch, 1, q_len, p + k_len].
        """
        shape = (self.prefix_length, self.num_heads, self.head_dim)
        init = initializers.embedding(self.init_std, (None, "heads", "kv"))

        def prepend(name, x):
            if prefix_kv is not None:
                prefix = prefix_kv[0 if name == "prefix_key" else 1].astype(x.dtype)
            else:
                prefix = self.param(name, init, shape, self.param_dtype).astype(x.dtype)
            prefix = jnp.broadcast_to(prefix[None], (x.shape[0], *shape))
            return jnp.concatenate([prefix, x], axis=1)

        visible = jnp.ones((*mask.shape[:-1], self.prefix_length), mask.dtype)
        return (prepend("prefix_key", key), prepend("prefix_value", value),
                jnp.concatenate([visible, mask], axis=-1))

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
