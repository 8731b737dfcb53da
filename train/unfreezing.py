"""Gradual unfreezing (ULMFiT, Howard & Ruder 2018): train the head first, then unfreeze
one block every `config.optim.gradual_unfreeze_every` steps from the top down, and the
embeddings last.

Phases: 0 = the head (and a pre-LN final norm), phase N - i = block i of N, phase N + 1 =
the embeddings. At step s every leaf whose phase is <= s // every trains. A wrapper
around the whole optimizer zeroes a not-yet-unfrozen leaf's gradient before the
optimizer (so its Adam moments stay zero and its update is exactly 0) and its update
after (so weight decay cannot move it either). Its gradient is still computed: the phases
share one compiled step instead of N + 2 recompilations.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import param_rules

EMBEDDINGS = re.compile(r"encoder/(token_embed|position_embed|type_embed|embed_norm|prompt)"
                        r"(/.*)?")
BLOCK = re.compile(r"encoder/block_(\d+)/.*")


def unfreeze_phase(path, num_layers):
    """The phase at which the parameter at `path` starts to train (see module doc)."""
    if match := BLOCK.fullmatch(path):
        return num_layers - int(match.group(1))
    if EMBEDDINGS.fullmatch(path):
        return num_layers + 1
    return 0  # Heads and the pre-LN final norm sit on top.


def unfreeze_phases(params):
    """Per-leaf int phase, a tree like `params`."""
    num_layers = param_rules.num_blocks(params)
    return param_rules.map_paths(lambda path: unfreeze_phase(path, num_layers), params)


def gradual_unfreezing(inner, every, params):
    """Wraps `inner` (any GradientTransformation) with the schedule; every=0: `inner`."""
    if not every:
        return inner
    if every < 0:
        raise ValueError(f"config.optim.gradual_unfreeze_every={every}; expected >= 0 "
                         "(0 = off)")
    phases = jax.tree_util.tree_leaves(unfreeze_phases(params))

    def init_fn(params):
        return (jnp.zeros((), jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None):
        count, inner_state = state
        unlocked = count // every

        def gate(tree):
            leaves, treedef = jax.tree_util.tree_flatten(tree)
            gated = [leaf * (phase <= unlocked).astype(leaf.dtype)
                     for leaf, phase in zip(leaves, phases)]
            return jax.tree_util.tree_unflatten(treedef, gated)

        updates, inner_state = inner.update(gate(updates), inner_state, params)
        return gate(updates), (optax.safe_increment(count), inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def unfreeze_steps(params, every):
    """{module: first step it trains}, e.g. {"encoder/block_3": 100, ...}: for the log."""
    steps = {}
    for path, phase in zip(param_rules.param_paths(params),
                           jax.tree_util.tree_leaves(unfreeze_phases(params))):
        names = path.split("/")
        module = "/".join(names[:2]) if names[0] == "encoder" else names[0]
        steps[module] = min(steps.get(module, np.inf), int(phase) * every)
    return steps
