"""Task routing: several tasks on one backbone, each with its own adapters and head.

`config.model.num_tasks` T > 0 stacks every task-specific parameter on a leading task
axis (Houlsby adapters [T, ...] in each block; the classification head's pooler and
classifier [T, ...]) and each row of a batch picks its task's slice by gather from
`task_ids` [batch]. One compiled step serves any mixture of tasks, and a task's
parameters receive gradient only from its own rows: the gather's transpose scatters a
row's gradient into its task's slice alone, so a slice no row selects gets exactly zero.

`config.model.task_classes` (C_0, ..., C_{T-1}): each task's class count. The head has
max(C_t) = `num_classes` outputs; a task's logits beyond its C_t are set to the dtype's
minimum, so softmax and argmax only ever see the task's own classes.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from model import initializers
from model.pooling import pool


def check(cfg):
    """Fails early, naming the key, on task fields that cannot describe a model."""
    num_tasks, classes = cfg["num_tasks"], tuple(cfg["task_classes"])
    if num_tasks < 0:
        raise ValueError(f"config.model.num_tasks={num_tasks}; expected >= 0 (0 = off)")
    if not num_tasks:
        return
    if len(classes) != num_tasks or any(int(c) < 2 for c in classes):
        raise ValueError(f"config.model.task_classes={classes}; expected one class count "
                         f">= 2 per task (config.model.num_tasks={num_tasks})")
    if max(classes) != cfg["num_classes"]:
        raise ValueError(f"config.model.num_classes={cfg['num_classes']} must equal "
                         f"max(config.model.task_classes)={max(classes)}")


def task_ids_or_fail(module, task_ids, batch_size):
    """The rows' task ids [batch]; `model.init` may omit them (every row task 0)."""
    if task_ids is None:
        if not module.is_initializing():
            raise ValueError("config.model.num_tasks > 0: the batch needs `task_ids` "
                             "[batch] (train/tasks/multitask.py adds them)")
        return jnp.zeros((batch_size,), jnp.int32)
    return task_ids.astype(jnp.int32)


class TaskDense(nn.Module):
    """A dense layer per task: kernel [T, in, out], bias [T, out]; row b uses task_ids[b].

    x [batch, ..., in] -> [batch, ..., out]. Each task's kernel is drawn like a plain
    [in, out] kernel (its own fans), or zeros with `zero_init` (an adapter's up-projection).
    """

    cfg: Any
    features: int
    zero_init: bool = False

    @nn.compact
    def __call__(self, x, task_ids):
        cfg = self.cfg
        per_task = initializers.base(cfg.init, cfg.init_std)

        def init(key, shape, dtype=jnp.float32):
            if self.zero_init:
                return jnp.zeros(shape, dtype)
            return jax.vmap(lambda k: per_task(k, shape[1:], dtype))(
                jax.random.split(key, shape[0]))

        kernel = self.param("kernel", nn.with_logical_partitioning(init, (None, None, None)),
                            (cfg.num_tasks, x.shape[-1], self.features), cfg.param_dtype)
        bias = self.param("bias", initializers.zeros((None, None)),
                          (cfg.num_tasks, self.features), cfg.param_dtype)
        w = kernel[task_ids].astype(cfg.dtype)  # [batch, in, out]
        b = bias[task_ids].astype(cfg.dtype)  # [batch, out]
        b = b.reshape(b.shape[:1] + (1,) * (x.ndim - 2) + b.shape[1:])
        return jnp.einsum("b...i,bio->b...o", x.astype(cfg.dtype), w) + b


class TaskAdapter(nn.Module):
    """Houlsby adapter per task: h + up_t(gelu(down_t(h))) on [batch, seq, embed]; `up`
    starts at zero, so every task starts at the base model (as model/transformer.Adapter)."""

    cfg: Any

    @nn.compact
    def __call__(self, h, task_ids):
        z = nn.gelu(TaskDense(self.cfg, self.cfg.adapter_dim, name="down")(h, task_ids),
                    approximate=False)
        return h + TaskDense(self.cfg, h.shape[-1], zero_init=True, name="up")(z, task_ids)


class TaskClassifyHead(nn.Module):
    """model/transformer.ClassifyHead per task: pooled [CLS] or mean, a task's pooler
    (dense + tanh) and classifier; hidden [batch, seq, embed] -> logits [batch, classes]."""

    cfg: Any

    @nn.compact
    def __call__(self, hidden, segment_ids, *, task_ids=None, deterministic=True):
        cfg = self.cfg
        task_ids = task_ids_or_fail(self, task_ids, hidden.shape[0])
        pooled = pool(hidden, segment_ids, cfg.pooling)
        pooled = jnp.tanh(TaskDense(cfg, cfg.hidden, name="pooler")(pooled, task_ids))
        pooled = nn.Dropout(cfg.dropout)(pooled, deterministic=deterministic)
        logits = TaskDense(cfg, cfg.num_classes, name="classifier")(pooled, task_ids)
        classes = jnp.asarray(cfg.task_classes, jnp.int32)[task_ids]  # [batch]
        valid = jnp.arange(cfg.num_classes)[None, :] < classes[:, None]
        return jnp.where(valid, logits, jnp.finfo(logits.dtype).min)
