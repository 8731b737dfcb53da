"""Log-probabilities of completion tokens and the reference policy.

The reference policy of a PEFT run is the same parameters applied by a second module
object whose config has the method's `off` fields (model/finetune_methods.py): the
adapter's parameters are simply not read, and nothing is copied. With LoRA's B at zero
(or any method initialised to the identity) the policy equals the reference exactly at
step 0. Full fine-tuning has no module to switch off: the reference is a frozen copy of
the starting parameters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from model import finetune_methods
from model.transformer import Model


def reference_model(model: Model) -> Model | None:
    """`model` with every active PEFT method's modules removed (and those the method
    replaces, e.g. P-tuning's prompt vectors); None when no PEFT method is active (full
    fine-tuning: the reference needs its own frozen parameters)."""
    active = finetune_methods.active(model.cfg)
    if not active:
        return None
    off = {}
    for name in active:
        method = finetune_methods.get(name)
        off.update(method.off)
        for replaced in method.replaces:
            off.update(finetune_methods.get(replaced).off)
    fields = {k: v for k, v in off.items() if hasattr(model.cfg, k)}
    return Model(dataclasses.replace(model.cfg, **fields))


def token_log_probs(model, params, batch):
    """log p(targets[b, j] | tokens[b, :j + 1]) [batch, seq] (float32), from one forward.

    batch: tokens, segment_ids, positions, targets [batch, seq] (targets = tokens
    shifted left); positions a row does not predict hold whatever the mask zeroes later.
    """
    outputs = model.apply({"params": params}, batch["tokens"],
                          segment_ids=batch["segment_ids"], positions=batch["positions"],
                          deterministic=True, heads=("lm",))
    log_probs = jax.nn.log_softmax(outputs["lm"].astype(jnp.float32))
    return jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]


def sequence_log_probs(token_lp, completion_mask):
    """Summed log-probs of each row's completion tokens: [batch, seq] -> [batch]."""
    return jnp.sum(token_lp * completion_mask, axis=-1)


def make_reference(model, start_params):
    """-> (reference model, reference params) for a policy `model` starting from
    `start_params`: (adapter-off model, None = read the policy's own params), or, with no
    PEFT method active, (the same model, a frozen copy of `start_params`)."""
    off = reference_model(model)
    if off is not None:
        return off, None
    return model, jax.tree.map(jnp.copy, start_params)


def reference_token_log_probs(ref_model, ref_params, policy_params, batch):
    """The reference policy's `token_log_probs` (no gradient): `ref_params` None reads
    the policy's params through the adapter-off model."""
    params = policy_params if ref_params is None else ref_params
    return jax.lax.stop_gradient(token_log_probs(ref_model, params, batch))
