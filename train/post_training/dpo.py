"""DPO's loss (Rafailov et al. 2023, eq. 7), a pure function of summed completion
log-probs under the policy and the reference:

    -log σ(β [(log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))])
"""

import jax
import jax.numpy as jnp


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, weights=None):
    """All [pairs] (summed log-probs of each completion). -> (mean loss over weighted
    pairs, metrics): reward_accuracy (pairs whose implicit reward ranks the chosen
    first), margin, chosen_reward and rejected_reward (β (log π - log π_ref))."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    losses = -jax.nn.log_sigmoid(margin)
    weights = jnp.ones_like(losses) if weights is None else weights.astype(jnp.float32)
    total = jnp.maximum(jnp.sum(weights), 1e-9)

    def mean(x):
        return jnp.sum(x * weights) / total

    metrics = {"reward_accuracy": mean((margin > 0).astype(jnp.float32)),
               "margin": mean(margin), "chosen_reward": mean(chosen_reward),
               "rejected_reward": mean(rejected_reward)}
    return mean(losses), metrics
