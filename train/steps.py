"""The compiled train and eval steps: pure functions `(state, batch) -> (state, metrics)`."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.param_rules import combine, partition


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def model_inputs(batch):
    """The keyword arguments `Model.__call__` takes from a batch."""
    keys = ("segment_ids", "positions", "token_type_ids", "prefix_mask", "mlm_positions",
            "task_ids")
    return {k: batch[k] for k in keys if k in batch}


def model_rows(batch):
    """-> (tokens, model inputs) the model runs on. A batch of (query, passage) pairs
    (task "retriever", train/tasks/pairs.py) runs both sides in one pass: [2 * batch, seq],
    queries first; the `passage_*` fields hold the passages' inputs."""
    # Image tasks' input is `pixels` [batch, H, W, C] (train/tasks/classify_image.py).
    tokens = batch["pixels"] if "pixels" in batch else batch["tokens"]
    inputs = model_inputs(batch)
    if "passage_tokens" in batch:
        tokens = jnp.concatenate([tokens, batch["passage_tokens"]])
        inputs = {k: jnp.concatenate([v, batch[f"passage_{k}"]]) for k, v in inputs.items()}
    return tokens, inputs


def split_microbatches(batch, num):
    """[batch, ...] -> [num, batch/num, ...], micro-batch i holding rows i, i+num, ...

    Strided so that each device keeps contributing its own rows to every micro-batch.
    """
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
    return jax.tree_util.tree_map(split, batch)


def make_train_step(model, tx, objective, *, seed, grad_accum_steps=1, schedule=None,
                    trainable=None):
    """`trainable`: a bool tree like params (`param_rules.trainable_mask`). When given,
    gradients are taken w.r.t. the trainable leaves only (frozen ones get zeros, are never
    differentiated) and frozen params are carried over bitwise unchanged.

    `seed=None`: the step takes the seed as a third argument, `(state, batch, seed)`, so it
    is not baked into the compiled program as a constant and runs that differ only in
    their seed share one executable (`SeededStep` passes it)."""

    def loss_fn(params, batch, dropout_key, frozen=None):
        if frozen is not None:
            params = combine(params, frozen)
        tokens, inputs = model_rows(batch)
        outputs = model.apply(
            {"params": params}, tokens, **inputs,
            deterministic=False, heads=objective.heads, rngs={"dropout": dropout_key})
        loss_sum, weight, sums = objective.loss(outputs, batch)
        return loss_sum, (weight, sums)

    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def grad_fn(params, batch, dropout_key):
        """(loss_sum, (weight, sums)), grads; grads hold None at frozen leaves."""
        if trainable is None:
            return value_and_grad(params, batch, dropout_key)
        differentiated, frozen = partition(params, trainable)
        return value_and_grad(differentiated, batch, dropout_key, frozen)

    def seeded_train_step(state, batch, seed):
        # Dropout keys derive from (seed, step): a resumed run draws the same masks.
        step_key = jax.random.fold_in(jax.random.key(seed), state.step)
        if grad_accum_steps == 1:
            (loss_sum, (weight, sums)), grads = grad_fn(state.params, batch, step_key)
        else:
            def accumulate(carry, micro):
                index, micro_batch = micro
                key = jax.random.fold_in(step_key, index)
                (loss, (weight, sums)), grads = grad_fn(state.params, micro_batch, key)
                return jax.tree_util.tree_map(jnp.add, carry, (loss, weight, sums, grads)), None

            micro = split_microbatches(batch, grad_accum_steps)
            zeros = jax.eval_shape(grad_fn, state.params,
                                   jax.tree_util.tree_map(lambda x: x[0], micro), step_key)
            (l0, (w0, s0)), g0 = jax.tree_util.tree_map(
                lambda s: jnp.zeros(s.shape, s.dtype), zeros)
            (loss_sum, weight, sums, grads), _ = jax.lax.scan(
                accumulate, (l0, w0, s0, g0), (jnp.arange(grad_accum_steps), micro))
        denominator = jnp.maximum(weight, 1e-9)
        grads = jax.tree_util.tree_map(lambda g: g / denominator, grads)
        if trainable is not None:
            frozen = partition(state.params, trainable)[1]
            grads = combine(grads, jax.tree_util.tree_map(jnp.zeros_like, frozen))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if trainable is not None:
            params = combine(partition(params, trainable)[0], frozen)
        # 1.0 where this step's loss or update is not finite; the loop stops on it
        # before the state can reach a checkpoint.
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(optax.tree.norm(updates))
        metrics = {
            "nonfinite": 1.0 - finite.astype(jnp.float32),
            "loss": loss_sum / denominator,
            "accuracy": sums["correct"] / jnp.maximum(sums["examples"], 1e-9),
            "grad_norm": optax.tree.norm(grads),
        }
        if hasattr(objective, "step_metrics"):  # An objective's own parts (e.g. mlm_loss).
            metrics.update(objective.step_metrics(sums))
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    if seed is None:
        return seeded_train_step
    return lambda state, batch: seeded_train_step(state, batch, seed)


class SeededStep:
    """A jitted `(state, batch, seed)` step called as `(state, batch)` with this run's
    seed; `.lower(...)` and its `.compile()` keep that calling convention."""

    def __init__(self, fn, seed):
        self._fn, self._seed = fn, np.int32(seed)

    def __call__(self, state, batch):
        return self._fn(state, batch, self._seed)

    def lower(self, state, batch):
        return SeededStep(self._fn.lower(state, batch, self._seed), self._seed)

    def compile(self):
        return SeededStep(self._fn.compile(), self._seed)

    @property
    def args_info(self):  # ((state, batch), kwargs): the seed is this wrapper's own.
        args, kwargs = self._fn.args_info
        return args[:2], kwargs

    def __getattr__(self, name):  # as_text, memory_analysis, cost_analysis, ...
        return getattr(self._fn, name)


def make_eval_step(model, objective):
    def eval_step(params, batch):
        tokens, inputs = model_rows(batch)
        outputs = model.apply({"params": params}, tokens, **inputs,
                              deterministic=True, heads=objective.heads)
        loss_sum, weight, sums = objective.loss(outputs, batch)
        return {"loss_sum": loss_sum, "weight": weight, **sums}

    return eval_step
