"""optax optimizer from `config.optim`: AdamW, warmup + decay, clipping, decay mask."""

import jax
import optax

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


def weight_decay_mask(params):
    """Decay matrices only: biases and norm scales/offsets (1-D) are left alone."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(optim_cfg, num_steps):
    if optim_cfg.name != "adamw":
        raise ValueError(f"config.optim.name={optim_cfg.name!r}; only 'adamw' is implemented")
    schedule = learning_rate_schedule(optim_cfg, num_steps)
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    parts.append(optax.adamw(
        schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay, mask=weight_decay_mask,
    ))
    return optax.chain(*parts), schedule
