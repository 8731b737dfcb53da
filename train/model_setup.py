"""Model, optimizer and train state built abstractly first, then sharded on the mesh.

`abstract_train_state` runs `init` under `jax.eval_shape` (no weights allocated), which
is what `--dry_run` and the ahead-of-time shardings use.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from model.transformer import Model, resolve
from train.init_from import check_hf_model_config
from train.optimizer import make_optimizer
from train.param_rules import map_paths, trainable_count, trainable_mask
from train.steps import TrainState
from train.unfreezing import gradual_unfreezing


def build_model(config):
    check_hf_model_config(config)  # A pre-trained checkpoint fixes the architecture.
    if config.data.seq_len > config.model.max_len:
        raise ValueError(
            f"config.data.seq_len={config.data.seq_len} exceeds config.model.max_len="
            f"{config.model.max_len} (the position-embedding table)")
    return Model(resolve(config.model))


def make_init_fn(model, tx, seq_len):
    """key -> TrainState whose params/opt_state are boxed with logical axis names."""
    def init_fn(key):
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        params = model.init({"params": key}, tokens, deterministic=True,
                            heads=model.cfg.heads, **init_inputs(model, tokens))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params))
    return init_fn


def state_shardings(abstract_boxed, mesh, rules):
    """Logical names -> NamedShardings; unnamed leaves (step, counts) are replicated."""
    specs = nn.get_partition_spec(abstract_boxed)
    specs = jax.tree_util.tree_map(
        lambda s: PartitionSpec() if s is None else s, specs,
        is_leaf=lambda s: s is None or isinstance(s, PartitionSpec))
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, nn.logical_to_mesh_axes(s, rules)), specs,
        is_leaf=lambda s: isinstance(s, PartitionSpec))


def abstract_params(model, seq_len):
    """Unboxed params as ShapeDtypeStructs: what param rules and optimizers are built on."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda key: nn.unbox(model.init(
        {"params": key}, tokens, deterministic=True, heads=model.cfg.heads,
        **init_inputs(model, tokens))["params"]), jax.random.key(0))


def init_inputs(model, tokens):
    """Extra inputs `model.init` needs: a prefix-LM mask wants a `prefix_mask`."""
    if model.cfg.attention_mask == "prefix":
        return {"prefix_mask": jnp.ones(tokens.shape, bool)}
    return {}


def build_optimizer(config, model):
    """-> (tx, schedule, trainable mask or None when everything trains)."""
    params = abstract_params(model, config.data.seq_len)
    tx, schedule = make_optimizer(config.optim, config.train.num_steps, params)
    tx = gradual_unfreezing(tx, config.optim.gradual_unfreeze_every, params)
    mask = trainable_mask(params, config.optim.param_rules)
    everything = all(jax.tree_util.tree_leaves(mask))
    return tx, schedule, None if everything else mask


def abstract_train_state(model, tx, seq_len):
    """(boxed abstract state, unboxed abstract state); allocates nothing."""
    boxed = jax.eval_shape(make_init_fn(model, tx, seq_len), jax.random.key(0))
    return boxed, nn.unbox(boxed)


def init_train_state(model, tx, seq_len, seed, shardings):
    init_fn = make_init_fn(model, tx, seq_len)
    # Each shard is initialised where it lives: no full copy on one device.
    return jax.jit(lambda key: nn.unbox(init_fn(key)), out_shardings=shardings)(
        jax.random.key(seed))


HEAD_MODULES = ("classify_head", "mlm_head")


def parameter_counts(params, trainable=None):
    """{"total", "trainable", "by_module"} over a (possibly abstract) params tree.

    `trainable`: None (all), a bool mask like params (`param_rules.trainable_mask`), or
    an int. `by_module` groups by the first two path components, e.g. "encoder/block_0".
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    by_module, total = {}, 0
    for path, leaf in flat:
        names = [getattr(k, "key", str(k)) for k in path]
        size = int(np.prod(leaf.shape))
        module = "/".join(names[:2]) if names[0] == "encoder" else names[0]
        by_module[module] = by_module.get(module, 0) + size
        total += size
    head = sum(n for m, n in by_module.items() if m in HEAD_MODULES)
    if trainable is None:
        trainable, without_head = total, total - head
    elif isinstance(trainable, (int, np.integer)):
        without_head = None
    else:
        without_head = trainable_count(params, map_paths(
            lambda p: p.split("/")[0] not in HEAD_MODULES, params), and_mask=trainable)
        trainable = trainable_count(params, trainable)
    # The PEFT papers' formulas count the method's parameters without the task head.
    return {"total": total, "trainable": int(trainable),
            "trainable_without_head": without_head, "by_module": by_module}
