"""GRPO's objective (Shao et al. 2024, DeepSeekMath §4.1), as pure functions.

For each prompt, G completions o_1..o_G with rewards r_i; the advantage of every token of
o_i is Â_i = (r_i - mean(r)) / (std(r) + eps) within the group (std with ddof=1, as
Tunix's `compute_advantages`). The per-token objective (minimised):

    -min(ρ_t Â_i, clip(ρ_t, 1 - ε, 1 + ε) Â_i) + β KL_t,   ρ_t = π(o_t) / π_old(o_t)
    KL_t = π_ref(o_t) / π(o_t) - log(π_ref(o_t) / π(o_t)) - 1     (Schulman's k3, >= 0)

averaged over each completion's tokens, then over completions ("sequence-mean-token-
mean"). With one update per rollout π_old = π (stop-gradient): ρ = 1 and only the
gradient of ρ carries the advantage.
"""

import jax.numpy as jnp
import numpy as np

ADVANTAGE_EPS = 1e-6
LOG_RATIO_BOUND = 20.0  # exp() stays finite when the policy has moved far (as Tunix).


def group_advantages(rewards):
    """rewards [prompts, G] -> advantages [prompts, G]: normalised within each group
    (a group whose rewards are all equal gets 0: no signal, no step)."""
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group_advantages needs rewards [prompts, G >= 2]; got shape "
                         f"{rewards.shape}")
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, ddof=1, keepdims=True)
    return ((rewards - mean) / (std + ADVANTAGE_EPS)).astype(np.float32)


def k3_kl(log_probs, ref_log_probs):
    """Per-token k3 estimate of KL(π || π_ref) from samples of π: exp(d) - d - 1, d =
    log π_ref - log π; 0 where they agree, never negative."""
    diff = ref_log_probs - log_probs
    return jnp.exp(diff) - diff - 1.0


def grpo_loss(log_probs, old_log_probs, ref_log_probs, advantages, completion_mask, *,
              clip_eps, kl_coef):
    """-> (loss, metrics). log_probs, old_log_probs, ref_log_probs, completion_mask
    [rows, seq] (the mask 1 where position j predicts a completion token); advantages
    [rows]. Rows without a completion token count for nothing.

    metrics (token means over completion tokens): kl, clip_fraction (tokens where the
    clipped term is the smaller, i.e. the clip binds), ratio; and policy_loss.
    """
    mask = completion_mask.astype(jnp.float32)
    log_ratio = jnp.clip(log_probs - old_log_probs, -LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = jnp.exp(log_ratio)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    policy_term = -jnp.minimum(unclipped, clipped)
    kl = k3_kl(log_probs, ref_log_probs)
    per_token = policy_term + kl_coef * kl
    tokens = jnp.sum(mask, axis=-1)
    has_tokens = (tokens > 0).astype(jnp.float32)
    rows = jnp.maximum(jnp.sum(has_tokens), 1.0)

    def sequence_mean_token_mean(x):
        per_row = jnp.sum(x * mask, axis=-1) / jnp.maximum(tokens, 1.0)
        return jnp.sum(per_row * has_tokens) / rows

    all_tokens = jnp.maximum(jnp.sum(mask), 1.0)
    binds = (clipped < unclipped).astype(jnp.float32)
    metrics = {"policy_loss": sequence_mean_token_mean(policy_term),
               "kl": jnp.sum(kl * mask) / all_tokens,
               "clip_fraction": jnp.sum(binds * mask) / all_tokens,
               "ratio": jnp.sum(ratio * mask) / all_tokens}
    return sequence_mean_token_mean(per_token), metrics
