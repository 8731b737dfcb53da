"""Elastic weight consolidation (Kirkpatrick et al. 2017): keep the weights that mattered
for earlier tasks near their values, in proportion to the diagonal Fisher information.

Penalty (added to the loss of the new task):  λ/2 Σ_i F_i (θ_i − θ*_i)²
  θ*  the parameters the run starts from (the previous task's end: `config.init_from`,
      as L2-SP's anchor in train/regularizers.py),
  F   the diagonal empirical Fisher on earlier tasks' data,
      F_i = 1/N Σ_n (∂ log p(y_n | x_n; θ*) / ∂θ_i)², per-example gradients squared,
  λ   `config.optim.ewc_strength`; F is read from `config.optim.ewc_fisher` (an .npz of
      "/"-joined parameter paths -> arrays, `save_fisher`).

With several earlier tasks the Fisher files are summed and the anchor is the latest
weights ("online EWC", Schwarz et al. 2018, with γ = 1). Like train/regularizers.py the
penalty enters as its gradient λ F (θ − θ*), added to the loss gradient before clipping
and Adam; the anchor and F live in the transform's state (two param-sized buffers, saved
with the checkpoint, so a resumed run keeps them).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import meta

from train import param_rules
from train.steps import model_rows


class EwcState(NamedTuple):
    anchor: optax.Params  # θ*: like the (trainable) params.
    fisher: optax.Params  # F: like the (trainable) params.


def penalty(params, anchor, fisher, strength):
    """λ/2 Σ F (θ − θ*)² over every leaf (a scalar; the reference the transform's
    gradient is the derivative of)."""
    terms = jax.tree_util.tree_map(
        lambda p, a, f: jnp.sum(f * jnp.square(p - a)), params, anchor, fisher)
    return 0.5 * strength * sum(jax.tree_util.tree_leaves(terms))


def _is_box(x):
    return isinstance(x, meta.AxisMetadata)


def _rebox(like, value):
    return like.replace_boxed(value) if _is_box(like) else value


def load_fisher(path, params):
    """The Fisher file `path` as a tree like `params` (boxes kept); a parameter the file
    lacks (e.g. one frozen when it was measured) gets F = 0."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.optim.ewc_fisher={path!r} is not a file; "
                                f"train/experiments/continual.py writes it after a task")
    with np.load(path) as f:
        stored = {k: f[k] for k in f.files}

    def leaf(key_path, p):
        name = param_rules.path_string(key_path)
        value = p.unbox() if _is_box(p) else p
        if name not in stored:
            return _rebox(p, jnp.zeros(value.shape, value.dtype))
        if tuple(stored[name].shape) != tuple(value.shape):
            raise ValueError(f"config.optim.ewc_fisher={path!r}: {name} has shape "
                             f"{stored[name].shape}, the model's is {tuple(value.shape)}")
        return _rebox(p, jnp.asarray(stored[name], value.dtype))

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_is_box)


def add_ewc_gradient(strength, fisher_path):
    """g -> g + λ F (θ − θ*) per leaf; θ* = the params at `init`, F from `fisher_path`."""
    if strength < 0:
        raise ValueError(f"config.optim.ewc_strength={strength} must be >= 0")
    if not fisher_path:
        raise ValueError("config.optim.ewc_strength > 0 needs config.optim.ewc_fisher "
                         "(the .npz train/ewc.py save_fisher writes)")

    def init_fn(params):
        # A real copy: the anchor must not share a buffer with params (both are donated).
        anchor = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)
        return EwcState(anchor=anchor, fisher=load_fisher(fisher_path, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("EWC needs params: tx.update(grads, state, params)")
        out = jax.tree_util.tree_map(
            lambda g, p, a, f: g + (strength * f * (p - a)).astype(g.dtype),
            updates, params, state.anchor, state.fisher)
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


def classification_log_likelihood(model):
    """(params, batch) -> log p(label | row) [batch] under `model`'s classify head (no
    dropout); the batch as the classification tasks yield it."""
    def log_likelihood(params, batch):
        tokens, inputs = model_rows(batch)
        logits = model.apply({"params": params}, tokens, **inputs, deterministic=True,
                             heads=("classify",))["classify"].astype(jnp.float32)
        log_p = jax.nn.log_softmax(logits)
        return jnp.take_along_axis(log_p, batch["labels"][:, None], axis=-1)[:, 0]
    return log_likelihood


def diagonal_fisher(log_likelihood, params, batches):
    """F = 1/N Σ_n (∇θ log p(y_n | x_n))² over the real rows (example_weight 1) of
    `batches` (an iterable of batch dicts); per-example gradients by vmap."""
    def per_example(params, row):
        return log_likelihood(params, jax.tree_util.tree_map(lambda x: x[None], row))[0]

    @jax.jit
    def squared_sum(params, batch):
        grads = jax.vmap(jax.grad(per_example), in_axes=(None, 0))(params, batch)
        weight = batch["example_weight"].astype(jnp.float32)
        return jax.tree_util.tree_map(
            lambda g: jnp.einsum("b...,b->...", jnp.square(g.astype(jnp.float32)), weight),
            grads)

    total, count = None, 0.0
    for batch in batches:
        sums = squared_sum(params, batch)
        total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
        count += float(np.sum(batch["example_weight"]))
    if total is None or count == 0:
        raise ValueError("diagonal_fisher read no real example")
    return jax.tree_util.tree_map(lambda s: s / count, total)


def save_fisher(path, fisher, previous=None):
    """Writes `fisher` (+ the Fisher file `previous`, summed: online EWC) as an .npz of
    path -> array; atomically (a temp file renamed over `path`)."""
    flat = {param_rules.path_string(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(fisher)[0]}
    if previous:
        with np.load(previous) as f:
            for k in f.files:
                flat[k] = flat[k] + f[k] if k in flat else f[k]
    # The first Fisher of a sequence precedes its method's first phase directory.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)
    return path
