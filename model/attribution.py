"""Explanations of a prediction: integrated gradients, attention rollout, attention mass.

Pure functions (jax/numpy in, arrays out); train/explain.py wires them to a run's model,
tokenizer and data, launch/explain.py to the command line.

- `integrated_gradients` (Sundararajan et al. 2017) over any float input (token
  embeddings, pixels) of any scalar function (a target logit), with the completeness
  check: the attributions sum to f(x) - f(baseline), up to the quadrature error.
- `attention_rollout` (Abnar & Zuidema 2020): per layer, heads averaged, the residual
  added as identity, rows renormalised; the layers multiplied from the bottom up.
- `span_attention_mass`: how much attention a set of query positions (an answer) puts on
  each span of keys (retrieved passages), averaged over layers, heads and queries.
- `embedding_logit_fn`: the shared transformer's target logit as a function of its input
  token embeddings, for integrated gradients over tokens.
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

log = logging.getLogger("strata")

# Quadrature rules over the straight path baseline -> x: (alphas, weights) for m steps.
# Trapezoid evaluates m + 1 points and is exact for a linear path integrand.
IG_METHODS = {
    "left": lambda m: (np.arange(m) / m, np.full(m, 1.0 / m)),
    "right": lambda m: (np.arange(1, m + 1) / m, np.full(m, 1.0 / m)),
    "midpoint": lambda m: ((np.arange(m) + 0.5) / m, np.full(m, 1.0 / m)),
    "trapezoid": lambda m: (np.arange(m + 1) / m,
                            np.concatenate([[0.5], np.ones(m - 1), [0.5]]) / m),
}


@dataclasses.dataclass
class Attribution:
    """Integrated gradients of f at x: `attributions` shaped like x (float32), f(x),
    f(baseline), and the completeness gap |sum - (f(x) - f(baseline))| absolute and
    relative to |f(x) - f(baseline)|."""
    attributions: np.ndarray
    value: float
    baseline_value: float
    completeness_abs_error: float
    completeness_rel_error: float


def quadrature(steps: int, method: str = "trapezoid"):
    """-> (alphas float64 [n], weights float64 [n]) of `method` with `steps` intervals."""
    if method not in IG_METHODS:
        raise ValueError(f"integrated gradients method={method!r}; expected one of "
                         f"{sorted(IG_METHODS)}")
    if steps < 1:
        raise ValueError(f"integrated gradients steps={steps}; expected >= 1")
    return IG_METHODS[method](steps)


def integrated_gradients(fn, x, baseline=None, *, steps: int = 64, method: str = "trapezoid",
                         chunk: int = 16) -> Attribution:
    """IG_i = (x_i - x0_i) * integral_0^1 df/dx_i(x0 + a (x - x0)) da, by quadrature.

    fn: float array shaped like x -> scalar (traceable by jax). x, baseline: float arrays
    of one shape (baseline default zeros). Gradients are taken `chunk` path points at a
    time (one compiled vmapped gradient; the last chunk padded with zero weight), so
    memory is bounded by `chunk` forward/backward passes whatever `steps` is.
    """
    x = jnp.asarray(x, jnp.float32)
    baseline = jnp.zeros_like(x) if baseline is None else jnp.asarray(baseline, jnp.float32)
    if baseline.shape != x.shape:
        raise ValueError(f"integrated gradients: baseline shape {baseline.shape} != input "
                         f"shape {x.shape}")
    alphas, weights = quadrature(steps, method)
    pad = -len(alphas) % chunk
    alphas = np.concatenate([alphas, np.zeros(pad)]).astype(np.float32)
    weights = np.concatenate([weights, np.zeros(pad)]).astype(np.float32)
    delta = x - baseline

    @jax.jit
    def weighted_grad_sum(alpha, weight):  # [chunk] -> sum_k w_k grad f(x0 + a_k delta).
        points = baseline[None] + alpha.reshape(-1, *([1] * x.ndim)) * delta[None]
        grads = jax.vmap(jax.grad(fn))(points)
        return jnp.tensordot(weight, grads, axes=1)

    total = jnp.zeros_like(x)
    for start in range(0, len(alphas), chunk):
        total = total + weighted_grad_sum(alphas[start:start + chunk],
                                          weights[start:start + chunk])
    attributions = np.asarray(delta * total, np.float32)
    value_fn = jax.jit(fn)  # One compilation for both ends, not op-by-op dispatch.
    value, baseline_value = float(value_fn(x)), float(value_fn(baseline))
    gap = abs(float(attributions.astype(np.float64).sum()) - (value - baseline_value))
    return Attribution(attributions, value, baseline_value, gap,
                       gap / max(abs(value - baseline_value), 1e-12))


def check_completeness(result: Attribution, tolerance: float, what: str = "") -> None:
    """Raises when the completeness gap exceeds `tolerance` (relative) and is not tiny in
    absolute terms (a logit difference near zero makes any relative error large)."""
    if result.completeness_rel_error > tolerance and result.completeness_abs_error > 1e-4:
        raise ValueError(
            f"integrated gradients{' of ' + what if what else ''}: the attributions sum "
            f"to f(x) - f(baseline) = {result.value - result.baseline_value:.5g} only within "
            f"{result.completeness_rel_error:.2%} (absolute {result.completeness_abs_error:.3g}"
            f"), above the tolerance {tolerance:.2%}; raise --ig_steps")


def attention_rollout(attentions, residual: float = 0.5):
    """Attention rollout of one example (Abnar & Zuidema 2020).

    attentions: [layers, heads, seq, seq], rows summing to one (query -> key).
    Per layer A = residual * I + (1 - residual) * mean_heads(attentions), rows
    renormalised; rollout = A_L ... A_1. -> [seq, seq]: row i is how much of position
    i's final representation flows from each input position. Works on numpy or jax
    arrays (returns the same kind).
    """
    xp = jnp if isinstance(attentions, jax.Array) else np
    if attentions.ndim != 4 or attentions.shape[-1] != attentions.shape[-2]:
        raise ValueError(f"attention_rollout expects [layers, heads, seq, seq], got "
                         f"{tuple(attentions.shape)}")
    seq = attentions.shape[-1]
    rollout = xp.eye(seq, dtype=attentions.dtype)
    for layer in attentions:
        mixed = residual * xp.eye(seq, dtype=layer.dtype) + (1 - residual) * layer.mean(0)
        mixed = mixed / mixed.sum(-1, keepdims=True)
        rollout = mixed @ rollout
    return rollout


def stack_attention(intermediates, real_keys=None):
    """The `attention_weights` a model sowed (model/attention.py) -> [layers, batch, heads,
    q, k] float32, layers in order. Keys prepended by prefix tuning (k > q) are dropped
    and the rows renormalised over the real keys (`real_keys`, default the last q)."""
    encoder = intermediates["encoder"]
    layers = sorted((name for name in encoder if name.startswith("block_")),
                    key=lambda name: int(name.split("_")[1]))
    if not layers:
        raise ValueError("No attention weights were sown: call Model.apply with "
                         "mutable=['intermediates']")
    weights = jnp.stack([encoder[n]["attention"]["attention_weights"][0] for n in layers])
    q_len, k_len = weights.shape[-2:]
    real_keys = q_len if real_keys is None else real_keys
    if k_len > real_keys:
        weights = weights[..., k_len - real_keys:]
        weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)
    return weights


def span_attention_mass(attentions, query_positions, spans):
    """attentions [layers, heads, seq, seq] of one example; query_positions [n] ints;
    spans {name: (start, end)} half-open key ranges. -> ({name: mean over layers, heads and
    queries of the attention summed over the span}, per-key mass [seq]: the same mean
    per key position)."""
    attentions = np.asarray(attentions, np.float64)
    rows = attentions[:, :, np.asarray(query_positions), :]  # [layers, heads, n, seq]
    per_key = rows.mean(axis=(0, 1, 2))
    return ({name: float(per_key[start:end].sum()) for name, (start, end) in spans.items()},
            per_key)


def embedding_logit_fn(model, params, tokens, *, target, head="classify", **inputs):
    """-> (fn, embeddings): fn(embeddings [seq, embed]) -> the `head` output's `target`
    entry for one example `tokens` [seq] (int), the model run on the given token
    embeddings in place of its embedding lookup (positions, types and everything after
    are the model's own); embeddings: the looked-up ones, fn's natural input.

    `inputs`: further model keyword arguments of the one example, each [seq] (segment_ids,
    positions, ...). The lookup is replaced through flax's method interception of
    `Encoder.embed_tokens`, so the model code needs no special path.
    """
    tokens = jnp.asarray(tokens)[None]
    inputs = {k: jnp.asarray(v)[None] for k, v in inputs.items()}
    embeddings = model.apply({"params": params}, tokens,
                             method=lambda m, t: m.encoder.embed_tokens(t))[0]

    def fn(x):
        def replace_lookup(next_fun, args, kwargs, context):
            if context.method_name == "embed_tokens":
                return x[None].astype(embeddings.dtype)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(replace_lookup):
            out = model.apply({"params": params}, tokens, **inputs, deterministic=True,
                              heads=(head,))[head]
        return out[0, target].astype(jnp.float32)

    return fn, embeddings
