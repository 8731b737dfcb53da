"""The one trainer builder: config -> mesh -> model -> optimizer -> abstract state ->
shardings -> jitted train and eval steps.

The loop, the ahead-of-time compile (train/aot.py) and the benchmarks all build their
steps here, so what they compile, time and measure is the step a run trains with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable

import jax
import numpy as np
from flax import linen as nn

from train import checkpoints as ckpt
from train import flops, model_setup, partitioning, tasks
from train.data import pipeline
from train.optimizer import optimizer_state_bytes
from train.param_rules import path_string
from train.steps import SeededStep, make_eval_step, make_train_step
from train.unfreezing import unfreeze_steps

log = logging.getLogger("strata")


@dataclasses.dataclass
class Setup:
    """What needs no device: model, optimizer, abstract (unboxed) state, counts."""

    model: nn.Module
    tx: object
    schedule: Callable | None
    trainable: object  # A bool tree like params, or None when everything trains.
    boxed: object  # Abstract state with logical axis names (for shardings).
    abstract: object  # Abstract state, unboxed.
    counts: dict  # parameter_counts + optimizer_state_bytes.


def abstract_setup(config) -> Setup:
    """Model and optimizer built abstractly (`jax.eval_shape`): nothing allocated."""
    model = model_setup.build_model(config)
    tx, schedule, trainable = model_setup.build_optimizer(config, model)
    boxed, abstract = model_setup.abstract_train_state(model, tx, config.data.seq_len)
    counts = model_setup.parameter_counts(abstract.params, trainable)
    counts["optimizer_state_bytes"] = optimizer_state_bytes(abstract.opt_state)
    return Setup(model, tx, schedule, trainable, boxed, abstract, counts)


def check_batches_divide(config, mesh):
    partitioning.check_batch_divides(config.data.batch_size, mesh)
    # Each micro-batch of gradient accumulation is itself split over the mesh.
    partitioning.check_batch_divides(
        config.data.batch_size // config.optim.grad_accum_steps, mesh,
        "config.data.batch_size / config.optim.grad_accum_steps")
    partitioning.check_batch_divides(config.data.eval_batch_size, mesh,
                                     "config.data.eval_batch_size")


@dataclasses.dataclass
class Trainer:
    """Everything a run's steps need, on one mesh. `train_step` / `eval_step` are jitted
    (compiled on first call, or ahead with `compile_train_step`)."""

    config: object
    task: tasks.Task
    setup: Setup
    mesh: jax.sharding.Mesh
    rules: tuple
    objective: object
    shardings: object  # NamedShardings like the (unboxed) state.
    batch_sharding: jax.sharding.NamedSharding
    train_step: Callable
    eval_step: Callable
    flops_per_token: float

    @property
    def model(self):
        return self.setup.model

    @property
    def counts(self):
        return self.setup.counts

    @contextlib.contextmanager
    def context(self):
        """The mesh and logical-axis rules every step runs under."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def abstract_state(self):
        """The state as ShapeDtypeStructs with this mesh's shardings (restore, AOT)."""
        return ckpt.abstract_with_shardings(self.setup.abstract, self.shardings)

    def init_state(self, seed=None):
        """A fresh state, each shard initialised where it lives."""
        seed = self.config.seed if seed is None else seed
        return model_setup.init_train_state(self.model, self.setup.tx,
                                            self.config.data.seq_len, seed, self.shardings)

    def init_params(self, paths, seed=None):
        """{path: fresh value} of just the parameters at `paths` (`init_params`)."""
        seed = self.config.seed if seed is None else seed
        return init_params(self.setup, self.shardings, self.config.data.seq_len, paths, seed)

    def init_state_from(self, init_from, seed=None):
        """-> (fresh state with `init_from`'s parameters loaded, init_from's report): equal
        to `init_state` followed by loading, without drawing the loaded weights first."""
        seed = self.config.seed if seed is None else seed
        return init_state_from(self.setup, self.shardings, self.config.data.seq_len,
                               init_from, seed)

    def init_opt_state(self, params):
        """Fresh optimizer state for `params` (a run starting from loaded weights)."""
        return init_opt_state(self.setup, self.shardings, params)

    def global_batch(self, local):
        return pipeline.to_global_batch(local, self.mesh)

    def compile_train_step(self, state, batch):
        """The train step compiled ahead for these (abstract or real) arguments."""
        with self.context():
            return self.train_step.lower(state, batch).compile()

    def evaluate(self, params, batches, max_steps=-1):
        """The objective's metrics over `max_steps` local batches (-1: all)."""
        return evaluate(self.eval_step, self.objective, params, batches, self.mesh,
                        self.rules, max_steps)

    def mfu(self, tokens_per_s):
        return tokens_per_s * self.flops_per_token / flops.peak_flops(self.mesh.devices.flat)


def _flat(tree):
    """[(parameter path, leaf)] in the tree's order."""
    return [(path_string(path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


# --- A run's first state, from its setup and shardings (the loop's and runners') --------

def init_params(setup, shardings, seq_len, paths, seed):
    """{path: fresh value} of just the parameters at `paths`, as a full init would draw
    them (flax derives each one's key from its name), each shard where it lives. XLA
    drops the rest of the init: a checkpoint's 135M weights are not first drawn at
    random only to be overwritten."""
    init_fn = model_setup.make_init_fn(setup.model, setup.tx, seq_len)
    placed = dict(_flat(shardings.params))
    paths = sorted(paths)

    def pick(key):
        params = dict(_flat(nn.unbox(init_fn(key)).params))
        return {path: params[path] for path in paths}

    return jax.jit(pick, out_shardings={p: placed[p] for p in paths})(jax.random.key(seed))


def init_opt_state(setup, shardings, params):
    return jax.jit(setup.tx.init, out_shardings=shardings.opt_state)(params)


def init_state_from(setup, shardings, seq_len, init_from, seed, load=None):
    """-> (fresh state with `init_from`'s parameters loaded, the load's report): equal to
    a full init followed by loading, drawing only the parameters the load leaves abstract
    (report["initialised"]). `load(init_from, abstract params) -> (params, report)`:
    default train/init_from.py `init_params_from`; a runner may transform what it reads
    (the post-training runner merges an SFT run's LoRA first)."""
    if load is None:
        from train.init_from import init_params_from as load

    abstract = ckpt.abstract_with_shardings(setup.abstract, shardings)
    loaded, report = load(init_from, abstract.params)  # Missing: still abstract.
    fresh = init_params(setup, shardings, seq_len, report["initialised"], seed)
    params = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(loaded),
        [fresh[path] if isinstance(leaf, jax.ShapeDtypeStruct) else leaf
         for path, leaf in _flat(loaded)])
    step = jax.device_put(np.zeros((), np.int32), shardings.step)
    return abstract.replace(step=step, params=params,
                            opt_state=init_opt_state(setup, shardings, params)), report


def evaluate(eval_step, objective, params, batches, mesh, rules, max_steps=-1):
    """Sums `eval_step(params, batch)` over local `batches` placed on `mesh`, then the
    objective's `finalize`: the one evaluation the loop and train/forgetting.py share."""
    totals = None
    for i, local in enumerate(batches):
        if 0 <= max_steps <= i:
            break
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            sums = eval_step(params, pipeline.to_global_batch(local, mesh))
        sums = jax.tree_util.tree_map(np.asarray, sums)
        totals = sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
    if totals is None:
        raise ValueError("Evaluation read no batch: the split is empty")
    return objective.finalize(totals)


def build_trainer(config, *, devices=None, train_source=None, objective=None) -> Trainer:
    """-> Trainer for `config` over `devices` (default: all). `train_source` lets the task
    derive data-dependent objective settings (class weights); `objective` replaces the
    task's (benchmarks)."""
    task = tasks.loop_task(config.task)
    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    mesh = partitioning.make_mesh(config.mesh, devices)
    check_batches_divide(config, mesh)
    setup = abstract_setup(config)
    if config.optim.gradual_unfreeze_every:
        log.info("Gradual unfreezing, first step each module trains: %s", unfreeze_steps(
            setup.abstract.params, config.optim.gradual_unfreeze_every))
    objective = objective or task.objective(config, train_source)
    shardings = model_setup.state_shardings(setup.boxed, mesh, rules)
    batch_sharding = partitioning.batch_sharding(mesh)
    replicated = partitioning.replicated(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # The seed is an argument, not a constant: seeds of one sweep share executables.
        train_step = SeededStep(jax.jit(
            make_train_step(setup.model, setup.tx, objective, seed=None,
                            grad_accum_steps=config.optim.grad_accum_steps,
                            schedule=setup.schedule, trainable=setup.trainable),
            in_shardings=(shardings, batch_sharding, replicated),
            out_shardings=(shardings, replicated), donate_argnums=(0,)), config.seed)
        eval_step = jax.jit(make_eval_step(setup.model, objective),
                            in_shardings=(shardings.params, batch_sharding),
                            out_shardings=replicated)
    flops_per_token = flops.train_flops_per_token(
        setup.model.cfg, config.data.seq_len, task.lm_positions_fraction(config))
    return Trainer(config, task, setup, mesh, rules, objective, shardings, batch_sharding,
                   train_step, eval_step, flops_per_token)
