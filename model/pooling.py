"""Sequence pooling for the classification heads (plain and per-task)."""

import jax.numpy as jnp


def pool(hidden, segment_ids, pooling):
    """[batch, length, hidden] -> [batch, hidden]: the first position ("cls") or the mean
    over the first sequence's tokens ("mean": segment 1; padding excluded)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        weights = (segment_ids == 1).astype(hidden.dtype)[..., None]
        return (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    raise ValueError(f"config.model.pooling={pooling!r}; expected 'cls' or 'mean'")
