"""Weight initialisers selectable by `config.model.init`, with logical axis names."""

import math

import jax.numpy as jnp
from flax import linen as nn
from jax.nn import initializers as jinit

INITS = ("truncated_normal", "xavier", "he")


def base(name, std=0.02):
    """The unnamed initialiser.

    truncated_normal: BERT's N(0, std^2) truncated at +-2 std (std of the *untruncated*
      normal, as in BERT's TF code). xavier: Glorot uniform, var = 2 / (fan_in + fan_out).
    he: Kaiming normal, var = 2 / fan_in (jax "normal" is untruncated).
    """
    if name == "truncated_normal":
        return jinit.truncated_normal(stddev=std, lower=-2.0, upper=2.0)
    if name == "xavier":
        return jinit.variance_scaling(1.0, "fan_avg", "uniform")
    if name == "he":
        return jinit.variance_scaling(2.0, "fan_in", "normal")
    raise ValueError(f"config.model.init={name!r}; expected one of {INITS}")


def kernel(name, std, logical_axes, in_ndim=1):
    """A kernel whose first `in_ndim` axes are fan-in and the rest fan-out.

    Multi-axis kernels ([embed, heads, head_dim]) are drawn flattened to 2-D, so the fans
    are embed -> heads*head_dim, then reshaped.
    """
    flat_init = base(name, std)

    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[:in_ndim])
        return flat_init(key, (fan_in, math.prod(shape) // fan_in), dtype).reshape(shape)

    return nn.with_logical_partitioning(init, logical_axes)


def embedding(std, logical_axes):
    # Embeddings are lookups, not fan-in products: BERT's N(0, std) for every `init`.
    return nn.with_logical_partitioning(
        jinit.truncated_normal(stddev=std, lower=-2.0, upper=2.0), logical_axes
    )


def zeros(logical_axes):
    return nn.with_logical_partitioning(jinit.zeros, logical_axes)


def ones(logical_axes):
    return nn.with_logical_partitioning(jinit.ones, logical_axes)



def lora_a(in_ndim, logical_axes):
    """LoRA's A [*in, r]: HF PEFT's kaiming_uniform_(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in))."""
    return nn.with_logical_partitioning(
        jinit.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                               in_axis=tuple(range(in_ndim)), out_axis=in_ndim),
        logical_axes)
