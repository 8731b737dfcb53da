"""FLOP counts for MFU and a measured peak matmul throughput of the device."""

import functools
import time

import jax
import jax.numpy as jnp


def train_flops_per_token(model_cfg, seq_len, vocab_positions_fraction=0.0):
    """Matmul FLOPs of one train step per token (forward + backward = 3x forward).

    Blocks: 2 * (4 H^2 + 2 H M) forward per token per layer; attention scores and
    weighted values 2 * 2 * seq * H (PaLM appendix B). A vocabulary head adds 2 * H * V
    (+ 2 H^2 for BERT's transform) on the fraction of positions it is computed at.
    """
    hidden, mlp, layers = model_cfg.hidden, model_cfg.mlp_dim, model_cfg.num_layers
    qkvo = 4 * hidden * model_cfg.num_heads * (model_cfg.head_dim
                                                if model_cfg.head_dim > 0
                                                else hidden // model_cfg.num_heads)
    forward = layers * (2 * (qkvo + 2 * hidden * mlp) + 4 * seq_len * hidden)
    forward += vocab_positions_fraction * 2 * (hidden * model_cfg.vocab_size + hidden * hidden)
    return 3 * forward


@functools.cache
def measured_peak_flops(size=None, dtype="float32"):
    """Best FLOP/s of a large square matmul on the default device (several trials)."""
    platform = jax.devices()[0].platform
    size = size or (2048 if platform == "cpu" else 8192)
    dtype = jnp.dtype(dtype if platform == "cpu" else "bfloat16")
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(devices=None):
    """Peak FLOP/s of `devices` together (default: all). Fake CPU devices share their
    host's cores: each process's measured peak counts once, however many devices it is
    split into."""
    devices = list(jax.devices() if devices is None else devices)
    if devices[0].platform == "cpu":
        return measured_peak_flops() * len({d.process_index for d in devices})
    return measured_peak_flops() * len(devices)
