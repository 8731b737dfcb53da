"""Regularisation toward zero or toward the pre-trained weights (L2-SP), as an optax transform.

The penalty l2/2 * ||θ - a||² + l1 * ||θ - a||₁ enters as its gradient,
l2 * (θ - a) + l1 * sign(θ - a), added to the loss gradient before clipping and Adam: the
same as adding the penalty to the loss (so, unlike AdamW's decoupled weight decay, Adam
rescales it). The anchor `a` per parameter (`config.optim.regularize_toward`):

- "zero": a = 0, on the leaves weight decay touches only (matrices: never biases, norm
  scales/offsets or (IA)^3 scales, which zero would break rather than simplify).
- "init": a = θ0, the parameters the run started from (after `config.init_from` loading;
  the loop re-initialises the optimizer state on them), on every trainable leaf, biases
  and norms included: L2-SP (Li et al., 2018) pulls all of the pre-trained weights w_S
  toward w_S^0. Leaves matching `fresh_pattern` (`config.optim.regularize_fresh`, by
  default the classification head, initialised at random) have no meaningful θ0: they are
  pulled toward zero instead, matrices only (the paper's β ||w_Ŝ||² term).

θ0 lives in the transform's state (a copy of the trainable params: one more param-sized
buffer). Inside `make_optimizer`'s multi_transform it sits in the trainable branch, so
frozen parameters still hold no state.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from train import param_rules

TOWARD = ("zero", "init")
FRESH_PATTERN = r"classify_head/.*"


class AnchorState(NamedTuple):
    anchor: optax.Params  # θ0: like the (trainable) params.


def check_strengths(optim_cfg) -> tuple[float, float, str]:
    """(l2, l1, toward) from config.optim, with errors naming the key."""
    l2 = float(optim_cfg.get("l2_strength", 0.0))
    l1 = float(optim_cfg.get("l1_strength", 0.0))
    toward = optim_cfg.get("regularize_toward", "zero")
    for key, value in (("l2_strength", l2), ("l1_strength", l1)):
        if value < 0:
            raise ValueError(f"config.optim.{key}={value} must be >= 0")
    if toward not in TOWARD:
        raise ValueError(f"config.optim.regularize_toward={toward!r}; expected one of {TOWARD}")
    return l2, l1, toward


def _copy(x):
    # A real copy: the anchor must not share a buffer with params (both are donated).
    return jnp.array(x, copy=True)


def add_regularization_gradient(
    l2: float,
    l1: float,
    toward: str = "zero",
    *,
    decayed: Callable[[str, jax.Array], bool],
    fresh_pattern: str = FRESH_PATTERN,
) -> optax.GradientTransformation:
    """g -> g + l2 * (θ - a) + l1 * sign(θ - a) per leaf (see the module docstring).

    Args:
      l2, l1: strengths (per unit of loss; the penalty is l2/2 ||θ-a||² + l1 ||θ-a||₁).
      toward: "zero" or "init".
      decayed: (path string, leaf) -> whether toward-zero applies (weight decay's rule).
      fresh_pattern: regex (re.fullmatch over "/"-joined paths) of leaves "init" pulls to 0.
    """
    if toward not in TOWARD:
        raise ValueError(f"config.optim.regularize_toward={toward!r}; expected one of {TOWARD}")
    fresh = re.compile(fresh_pattern)

    def init_fn(params):
        if toward == "zero":
            return optax.EmptyState()
        return AnchorState(anchor=jax.tree_util.tree_map(_copy, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("The regulariser needs params: tx.update(grads, state, params)")
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        thetas = treedef.flatten_up_to(params)
        anchors = (treedef.flatten_up_to(state.anchor) if toward == "init"
                   else [None] * len(flat))
        out = []
        for (path, g), theta, anchor in zip(flat, thetas, anchors):
            name = param_rules.path_string(path)
            if toward == "init" and not fresh.fullmatch(name):
                diff = theta - anchor
            elif decayed(name, theta):
                diff = theta
            else:
                out.append(g)
                continue
            penalty = l2 * diff + l1 * jnp.sign(diff)
            out.append(g + penalty.astype(g.dtype))
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformation(init_fn, update_fn)
