"""optax optimizer from `config.optim`: AdamW, SGD, Adafactor, Lion or LAMB by name
(`OPTIMIZERS`), warmup + decay, clipping, decay mask, and
the per-parameter freezing / learning-rate multipliers of `config.optim.param_rules`
(see `train.param_rules`)."""

import jax
import numpy as np
import optax

from train import ewc, param_rules, regularizers

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(optim_cfg, num_steps):
    """Linear warmup to `lr`, then cosine / linear decay to `lr * end_lr_factor`."""
    lr, warmup = optim_cfg.lr, min(optim_cfg.warmup_steps, num_steps)
    end = lr * optim_cfg.end_lr_factor
    decay_steps = max(num_steps - warmup, 1)
    if optim_cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=optim_cfg.end_lr_factor)
    elif optim_cfg.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif optim_cfg.schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(
            f"config.optim.schedule={optim_cfg.schedule!r}; expected one of {SCHEDULES}")
    warmup_fn = optax.linear_schedule(0.0, lr, max(warmup, 1))
    return optax.join_schedules([warmup_fn, decay], [warmup])


def decays(path: str, p) -> bool:
    """Whether weight decay (and toward-zero regularisation) applies to the leaf at `path`."""
    name = path.rsplit("/", 1)[-1]
    return p.ndim > 1 and name != "bias" and not name.startswith("ia3_")


def weight_decay_mask(params):
    """Decay weights only, as BERT does: never biases (some are [heads, head_dim]), norm
    scales/offsets, or (IA)^3 scales (initialised to one: decay would pull them towards
    zeroing their keys/values)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: decays(param_rules.path_string(path), p), params)


def scale_by_multipliers(multiplier_of_path):
    """Multiplies each update by `multiplier_of_path[path]` (leaves at 1.0 untouched)."""
    def update_fn(updates, state, params=None):
        del params
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        scaled = []
        for path, u in flat:
            m = multiplier_of_path[param_rules.path_string(path)]
            scaled.append(u if m == 1.0 else u * np.asarray(m, u.dtype))
        return jax.tree_util.tree_unflatten(treedef, scaled), state
    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def _sgd(cfg, schedule):  # L2 weight decay through the gradient, as SGD papers use it.
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay, weight_decay_mask),
                       optax.sgd(schedule, momentum=cfg.momentum or None,
                                 nesterov=cfg.nesterov))


# config.optim.name -> (optim_cfg, schedule) -> the update rule, from optax. Each decays
# matrices only (weight_decay_mask); clipping, schedules, freezing and lr multipliers
# wrap whichever is chosen.
OPTIMIZERS = {
    "adamw": lambda cfg, schedule: optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=weight_decay_mask),
    "sgd": _sgd,  # optim.momentum (0: none), optim.nesterov.
    # Factored second moments (rows + columns of each matrix >= 128): the smallest state;
    # its weight decay is added after the learning rate (optax's adafactor).
    "adafactor": lambda cfg, schedule: optax.adafactor(
        schedule, weight_decay_rate=cfg.weight_decay or None,
        weight_decay_mask=weight_decay_mask),
    # Lion (Chen et al. 2023): sign updates, one moment; b1 and optim.lion_b2.
    "lion": lambda cfg, schedule: optax.lion(
        schedule, b1=cfg.b1, b2=cfg.lion_b2, weight_decay=cfg.weight_decay,
        mask=weight_decay_mask),
    "lamb": lambda cfg, schedule: optax.lamb(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=weight_decay_mask),
}


def check_optimizer(optim_cfg):
    if optim_cfg.name not in OPTIMIZERS:
        raise ValueError(f"config.optim.name={optim_cfg.name!r}; expected one of "
                         f"{sorted(OPTIMIZERS)} (optax's)")
    if optim_cfg.name == "sgd" and optim_cfg.nesterov and not optim_cfg.momentum:
        raise ValueError("config.optim.nesterov=True needs config.optim.momentum > 0")


def make_optimizer(optim_cfg, num_steps, params=None):
    """-> (tx, schedule). `params` (abstract is enough) is needed by `optim.param_rules`
    and `optim.layerwise_lr_decay`; without them the optimizer is plain clip + AdamW.

    With them, parameters are labelled "frozen" or "trainable" (`optax.multi_transform`):
    frozen ones get `set_to_zero` (no optimizer state: their Adam mu/nu are
    `optax.MaskedNode`s) and clipping sees only trainable gradients. A trainable leaf's
    AdamW update (lr * (adam + weight_decay * p)) is then multiplied by its multiplier, so
    the decoupled weight decay scales with its learning rate too. `optim.l2_strength` /
    `l1_strength` add train.regularizers' gradient first (in the trainable branch: frozen
    parameters get no anchor either).
    """
    check_optimizer(optim_cfg)
    schedule = learning_rate_schedule(optim_cfg, num_steps)
    parts = []
    l2, l1, toward = regularizers.check_strengths(optim_cfg)
    if l2 or l1:  # First: its gradient is clipped and Adam-scaled as the loss's would be.
        parts.append(regularizers.add_regularization_gradient(
            l2, l1, toward, decayed=decays,
            fresh_pattern=optim_cfg.get("regularize_fresh", regularizers.FRESH_PATTERN)))
    if optim_cfg.get("ewc_strength", 0.0):  # EWC's penalty gradient (train/ewc.py), too.
        parts.append(ewc.add_ewc_gradient(float(optim_cfg.ewc_strength),
                                          optim_cfg.get("ewc_fisher", "")))
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    parts.append(OPTIMIZERS[optim_cfg.name](optim_cfg, schedule))
    rules = optim_cfg.get("param_rules", ()) or ()
    decay = optim_cfg.get("layerwise_lr_decay", 0.0) or 0.0
    if not rules and not decay:
        return optax.chain(*parts), schedule
    if params is None:
        raise ValueError("config.optim.param_rules / layerwise_lr_decay need make_optimizer("
                         "..., params=abstract_params)")
    multipliers = param_rules.lr_multipliers(params, rules, decay)  # Checks the rules.
    by_path = dict(zip(param_rules.param_paths(params), jax.tree_util.tree_leaves(multipliers)))
    if any(m != 1.0 for m in by_path.values()):
        parts.append(scale_by_multipliers(by_path))
    if all(m > 0.0 for m in by_path.values()):
        return optax.chain(*parts), schedule

    def labels(tree):  # A callable: init sees boxed params, update plain arrays.
        return param_rules.map_paths(
            lambda path: "trainable" if by_path[path] > 0.0 else "frozen", tree)
    return optax.multi_transform(
        {"trainable": optax.chain(*parts), "frozen": optax.set_to_zero()}, labels), schedule


def optimizer_state_bytes(opt_state):
    """Bytes held by an optimizer state's arrays (real or abstract)."""
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(opt_state)))
