"""Attention masks and multi-head attention with an optional KV cache.

Masks are pure functions of segment ids (0 = padding; packed rows carry one id per
sequence) so packing, padding and the three modes share one code path.
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec

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


# "xla": the einsum reference below. "dot_product": jax.nn.dot_product_attention (its XLA
# path). "cudnn": cuDNN flash attention (GPU). "splash": Pallas splash attention (TPU).
# "auto": per call, the first kernel that can run it (cudnn, splash), else "xla".
ATTENTION_IMPLS = ("xla", "dot_product", "cudnn", "splash", "auto")
KERNEL_PLATFORMS = {"cudnn": "gpu", "splash": "tpu"}  # jax.default_backend() each needs.
SPLASH_BLOCKS = (512, 256, 128)  # Splash tiles q and kv; a tile is a multiple of 128.


def dot_product_attention(query, key, value, mask, *, dropout_rng=None, dropout_rate=0.0,
                          deterministic=True, dtype=jnp.float32, impl="xla",
                          segment_ids=None, mask_mode="bidirectional", interpret=False,
                          kv_heads_first=False):
    """Scaled dot-product attention; softmax in float32.

    query [batch, q_len, heads, head_dim], key/value [batch, k_len, heads, head_dim],
    mask bool [batch, 1, q_len, k_len]. Returns [batch, q_len, heads, head_dim].
    `kv_heads_first=True`: key/value are [batch, heads, k_len, head_dim] (the KV cache's
    layout), which the einsum ("xla") reads without a transpose; no kernel takes it.

    The kernels: "cudnn" takes `mask` as it is (as an additive bias); "splash" rebuilds
    it from `segment_ids` [batch, seq] (the ids `mask` was made from; None when the
    caller passed its own mask) and `mask_mode`. `interpret=True` runs splash through the
    Pallas interpreter on any platform (tests; slow). A kernel that cannot do this call
    (platform, dtype, mask kind, attention dropout) raises a ValueError naming
    config.model.attention_impl and why.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(
            f"config.model.attention_impl={impl!r}; expected one of {ATTENTION_IMPLS}")
    if kv_heads_first and impl != "xla":
        raise ValueError(f"kv_heads_first keys/values need impl='xla', got {impl!r}")
    use_dropout = not deterministic and dropout_rate > 0.0
    why_not = functools.partial(
        kernel_unsupported, query=query, key=key, segment_ids=segment_ids,
        mask_mode=mask_mode, dropout_rate=dropout_rate if use_dropout else 0.0,
        interpret=interpret)
    if impl == "auto":
        impl = next((k for k in KERNEL_PLATFORMS if why_not(k) is None), "xla")
    elif impl in KERNEL_PLATFORMS and (reason := why_not(impl)) is not None:
        raise ValueError(f"config.model.attention_impl={impl!r}: {reason}")
    if impl == "cudnn":
        return jax.nn.dot_product_attention(query, key, value, mask=mask,
                                            implementation="cudnn").astype(dtype)
    if impl == "splash":
        key, value = repeat_kv(key, query.shape[2]), repeat_kv(value, query.shape[2])
        return splash_attention(query, key, value, segment_ids, causal=mask_mode == "causal",
                                interpret=interpret).astype(dtype)
    if impl == "dot_product" and not use_dropout:
        # jax.nn's default implementation: its XLA path (dropout falls to the einsum).
        return jax.nn.dot_product_attention(query, key, value, mask=mask).astype(dtype)
    kv = "bhkd" if kv_heads_first else "bkhd"  # The keys' and values' einsum axes.
    depth, (batch, q_len, heads, _) = query.shape[-1], query.shape
    weights = _grouped_weights(query, key, mask, kv_heads_first)
    if use_dropout:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = weights * keep / (1.0 - dropout_rate)
    # Heads-first out, then one transpose of the (small) result: XLA CPU otherwise runs
    # this product with a transposed operand, 1.5x slower per decoding step.
    out = jnp.einsum(f"bhgqk,{kv}->bhgqd", weights.astype(dtype), value)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, depth)


def _grouped_weights(query, key, mask, kv_heads_first=False):
    """Softmax attention probabilities, float32 [batch, kv_heads, group, q_len, k_len].

    Grouped-query attention: query head h reads key/value head h // group (group =
    heads / kv_heads), computed per group without copying the keys and values.
    """
    kv = "bhkd" if kv_heads_first else "bkhd"
    depth, (batch, q_len, heads, _) = query.shape[-1], query.shape
    kv_heads = key.shape[kv.index("h")]
    query = query / jnp.sqrt(depth).astype(query.dtype)
    query = query.reshape(batch, q_len, kv_heads, heads // kv_heads, depth)
    logits = jnp.einsum(f"bqhgd,{kv}->bhgqk", query, key).astype(jnp.float32)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def attention_weights(query, key, mask, kv_heads_first=False):
    """The explicit softmax(q k^T / sqrt(d)) the "xla" path computes, whatever kernel ran:
    float32 [batch, heads, q_len, k_len] (query head order; no dropout)."""
    weights = _grouped_weights(query, key, mask, kv_heads_first)
    batch, kv_heads, group, q_len, k_len = weights.shape
    return weights.reshape(batch, kv_heads * group, q_len, k_len)


def repeat_kv(x, heads):
    """[batch, seq, kv_heads, dim] -> [batch, seq, heads, dim], each kv head repeated for
    its group of query heads (for kernels without grouped-query support)."""
    return jnp.repeat(x, heads // x.shape[2], axis=2) if x.shape[2] != heads else x


def kernel_unsupported(impl, *, query, key, segment_ids, mask_mode, dropout_rate,
                       interpret=False, platform=None):
    """Why kernel `impl` ("cudnn" | "splash") cannot run this call, or None if it can."""
    platform = platform or jax.default_backend()
    if platform != KERNEL_PLATFORMS[impl] and not (impl == "splash" and interpret):
        return (f"{impl} runs on {KERNEL_PLATFORMS[impl]} only and this process's platform "
                f"is {platform!r}; use 'xla', 'dot_product' or 'auto'")
    if dropout_rate > 0:
        return (f"the {impl} kernel cannot drop attention probabilities "
                f"(config.model.attention_dropout={dropout_rate} in training); set it to 0.0 "
                f"or use 'xla'")
    if impl == "cudnn":
        if query.dtype not in (jnp.bfloat16, jnp.float16):
            return (f"cuDNN flash attention needs config.model.dtype 'bfloat16' or "
                    f"'float16', got {str(query.dtype)!r}")
        return None
    if segment_ids is None:
        return ("splash builds its mask from segment ids; an explicit attention mask "
                "(attention_mask passed to the model) cannot be expressed")
    if mask_mode not in ("bidirectional", "causal"):
        return (f"config.model.attention_mask={mask_mode!r} (a per-example prefix) cannot "
                f"be expressed as a splash mask; use 'xla' or 'cudnn'")
    if query.shape[1] != key.shape[1]:
        return ("keys prepended by prefix tuning (config.model.prefix_length) cannot be "
                "expressed as a splash mask")
    if query.shape[1] % SPLASH_BLOCKS[-1]:
        return (f"splash needs a sequence length that is a multiple of {SPLASH_BLOCKS[-1]}, "
                f"got {query.shape[1]}")
    return None


def splash_attention(query, key, value, segment_ids, *, causal, interpret=False):
    """Pallas splash (sparse flash) attention; [batch, seq, heads, head_dim] in and out.

    The mask is causal or full, and-ed with equal segment ids (so padding, id 0, only
    sees padding: its rows are never empty, and no real query sees it). Under a mesh
    the kernel runs per shard (shard_map over batch and heads, as the logical rules
    place them): XLA cannot partition a Pallas call itself.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # TPU kernel.

    seq = query.shape[1]
    block = next(b for b in SPLASH_BLOCKS if seq % b == 0)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)  # Splash does not scale.

    def attend(q, k, v, ids):  # [batch, heads, seq, head_dim] of one shard.
        one_head = splash.CausalMask((seq, seq)) if causal else splash.FullMask((seq, seq))
        kernel = splash.make_splash_mha(
            splash.MultiHeadMask([one_head] * q.shape[1]), block_sizes=sizes,
            head_shards=1, q_seq_shards=1, interpret=interpret)
        return jax.vmap(kernel)(q, k, v, splash.SegmentIds(q=ids, kv=ids))

    q, k, v = (x.transpose(0, 2, 1, 3) for x in (query, key, value))
    ids = segment_ids.astype(jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = attend(q, k, v, ids)
    else:
        batch_axes, head_axes = nn.logical_to_mesh_axes(("activation_batch",
                                                         "activation_heads"))
        heads = PartitionSpec(batch_axes, head_axes, None, None)
        out = jax.shard_map(attend, mesh=mesh, in_specs=(heads, heads, heads,
                                                         PartitionSpec(batch_axes, None)),
                            out_specs=heads, check_vma=False)(q, k, v, ids)
    return out.transpose(0, 2, 1, 3)


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
    use_bias: bool = True

    @nn.compact
    def __call__(self, x, deterministic=True):
        in_shape = x.shape[-self.in_ndim:]
        kernel = self.param(
            "kernel", initializers.kernel(self.init, self.init_std, self.logical_axes,
                                          self.in_ndim),
            (*in_shape, *self.features), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = _contract(x, kernel, self.in_ndim)
        if self.use_bias:
            y = y + self.param("bias", initializers.zeros(self.logical_axes[self.in_ndim:]),
                               self.features, self.param_dtype).astype(self.dtype)
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


def rotary(x, positions, base: float = 10_000.0):
    """Rotary position embedding (RoPE, Su et al. 2021) of queries or keys.

    x [batch, seq, heads, head_dim], positions int [batch, seq]. Channel pair (i, i + d/2)
    turns by positions * base^(-2i/d) (GPT-NeoX's half split), so a query-key dot product
    depends on their positions only through the offset between them: a model can learn
    "the token before me" once, for every position.
    """
    half = x.shape[-1] // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [b, s, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class MultiHeadAttention(nn.Module):
    """Self-attention over [batch, seq, embed]; `decode=True` uses a KV cache.

    Cache variables live in the "cache" collection: keys/values [batch, kv_heads, max_len,
    head_dim] and the write index. Heads come before slots because that is the layout the
    attention einsum reads: a step writes its one slot and reads the cache in place, where
    [batch, max_len, heads, head_dim] cost a transpose of the whole cache per layer and
    step. The caller passes the mask for the whole cache ([batch, 1, q_len, max_len]) when
    decoding. A caller may pass a shorter cache (the slots it will write;
    model/decoding.py does): its length is whatever it is given.
    """

    num_heads: int
    head_dim: int
    max_len: int
    init: str = "truncated_normal"
    init_std: float = 0.02
    dropout_rate: float = 0.0
    impl: str = "xla"  # One of ATTENTION_IMPLS.
    mask_mode: str = "bidirectional"  # What the mask was built as (the splash kernel's mask).
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: LoraSpec | None = None  # LoRA on the projections its `targets` name.
    ia3: bool = False  # (IA)^3: learned per-channel scales of keys and values.
    prefix_length: int = 0  # Prefix tuning: learned keys/values every query attends to.
    rope: bool = False  # Rotate queries and keys by `positions` (`rotary`).
    rope_theta: float = 10_000.0  # RoPE's base.
    num_kv_heads: int = 0  # Grouped-query attention's key/value heads; 0 = num_heads.
    use_bias: bool = True  # Biases on the four projections.

    @nn.compact
    def __call__(self, x, mask, *, deterministic=True, decode=False, prefix_kv=None,
                 segment_ids=None, positions=None):
        """`prefix_kv`: (keys, values) [prefix_length, heads, head_dim] made outside (the
        prefix-tuning MLP reparameterisation) instead of this layer's own prefix params.
        `segment_ids` [batch, seq]: the ids `mask` was built from (None for a mask the
        caller made), for kernels that build their own mask. `positions` [batch, seq]:
        the tokens' positions, which `rope` needs (cached keys are stored rotated;
        prefix-tuning keys are position-free)."""
        embed = x.shape[-1]

        def projection(name, heads):
            return Linear((heads, self.head_dim), ("embed", "heads", "kv"),
                          init=self.init, init_std=self.init_std, dtype=self.dtype,
                          param_dtype=self.param_dtype, lora=self._lora(name),
                          use_bias=self.use_bias, name=name)(x, deterministic)

        kv_heads = self.kv_heads
        query = projection("query", self.num_heads)
        key, value = projection("key", kv_heads), projection("value", kv_heads)
        axes = ("activation_batch", "activation_length", "activation_heads", "kv")
        query = nn.with_logical_constraint(query, axes)
        key = nn.with_logical_constraint(key, axes)
        value = nn.with_logical_constraint(value, axes)
        key, value = self.adapt_key_value(key, value)
        if self.rope:
            if positions is None:
                raise ValueError("config.model.position_embedding='rope' needs positions")
            query = rotary(query, positions, self.rope_theta)
            key = rotary(key, positions, self.rope_theta)

        if decode:  # From here on keys/values are [batch, kv_heads, slots, head_dim].
            key, value = self._update_cache(key, value)
        if self.prefix_length:  # After the cache: the cache holds real tokens only.
            key, value, mask = self._prepend_prefix(key, value, mask, prefix_kv,
                                                    heads_first=decode)

        dropout_rng = None
        if not deterministic and self.dropout_rate > 0:
            dropout_rng = self.make_rng("dropout")
        impl = self.impl
        if decode:
            # KV-cache steps take one query against a cache-wide mask: nothing for a
            # flash kernel to tile, and a mask splash cannot express. The einsum it is,
            # which also reads the heads-first cache without transposing it.
            impl = "xla"
        out = dot_product_attention(
            query, key, value, mask, dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
            deterministic=deterministic, dtype=self.dtype, impl=impl,
            segment_ids=segment_ids, mask_mode=self.mask_mode, kv_heads_first=decode,
        )
        if self.is_mutable_collection("intermediates"):
            # Opt-in (apply(..., mutable=["intermediates"])), for explanations (attention
            # rollout): the explicit weights even when a fused kernel ran. Compiled train
            # and eval steps never make the collection mutable, so they never compute it.
            self.sow("intermediates", "attention_weights",
                     attention_weights(query, key, mask, kv_heads_first=decode))
        out = nn.with_logical_constraint(out, axes)
        return Linear((embed,), ("heads", "kv", "embed"), in_ndim=2, init=self.init,
                      init_std=self.init_std, dtype=self.dtype,
                      param_dtype=self.param_dtype, lora=self._lora("out"),
                      use_bias=self.use_bias, name="out")(out, deterministic)

    @property
    def kv_heads(self):
        return self.num_kv_heads or self.num_heads

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
                          (self.kv_heads, self.head_dim), self.param_dtype)

    def _prepend_prefix(self, key, value, mask, prefix_kv=None, heads_first=False):
        """Prefix tuning (Li & Liang 2021): p learned `prefix_key`, `prefix_value`
        [p, heads, head_dim] before the keys/values [batch, k_len, heads, head_dim]
        ([batch, heads, k_len, head_dim] if `heads_first`: the cache's layout), visible to
        every query: mask [batch, 1, q_len, k_len] -> [batch, 1, q_len, p + k_len].
        """
        shape = (self.prefix_length, self.kv_heads, self.head_dim)
        init = initializers.embedding(self.init_std, (None, "heads", "kv"))

        def prepend(name, x):
            if prefix_kv is not None:
                prefix = prefix_kv[0 if name == "prefix_key" else 1].astype(x.dtype)
            else:
                prefix = self.param(name, init, shape, self.param_dtype).astype(x.dtype)
            prefix = jnp.broadcast_to(prefix[None], (x.shape[0], *shape))
            if heads_first:
                prefix = prefix.swapaxes(1, 2)
            return jnp.concatenate([prefix, x], axis=2 if heads_first else 1)

        visible = jnp.ones((*mask.shape[:-1], self.prefix_length), mask.dtype)
        return (prepend("prefix_key", key), prepend("prefix_value", value),
                jnp.concatenate([visible, mask], axis=-1))

    def _update_cache(self, key, value):
        """Writes key/value [batch, seq, kv_heads, head_dim] at the cache's index; returns
        the cache's keys/values [batch, kv_heads, slots, head_dim] (the new ones alone in
        the init pass, which only creates the cache)."""
        key, value = key.swapaxes(1, 2), value.swapaxes(1, 2)
        batch = key.shape[0]
        shape = (batch, self.kv_heads, self.max_len, self.head_dim)
        initialised = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        if not initialised:  # The init pass only creates the cache.
            return key, value
        start = (0, 0, index.value, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
        index.value = index.value + key.shape[2]
        return cached_key.value, cached_value.value
