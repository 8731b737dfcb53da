"""Ahead-of-time compilation of the train step (MaxText's `train_compile`): the step is
lowered and compiled for the mesh from abstract state and batch — shapes, dtypes and
shardings only, nothing allocated — and XLA reports the memory each device would need.

Run it before a pod job to catch an out-of-memory mesh in a minute instead of after the
queue: `python -m launch.main --config ... --workdir W --compile_only [--topology ...]`.
"""

import dataclasses
import math
import os
import time

import jax
import numpy as np
from flax import linen as nn

from train import memory, partitioning, tasks
from train.run_files import atomic_write_json
from train.trainer import build_trainer


def topology_devices(topology):
    """Devices to compile for: "" -> this machine's; "cpu:N" -> N of this machine's CPU
    devices; "tpu:NAME" (e.g. "tpu:v5e:4x4") -> a TPU topology described without the
    hardware (needs libtpu; `jax.experimental.topologies`)."""
    if not topology:
        return jax.devices()
    platform, _, name = topology.partition(":")
    if platform == "cpu":
        count = int(name or len(jax.devices("cpu")))
        devices = jax.devices("cpu")
        if count > len(devices):
            raise ValueError(
                f"--topology={topology}: only {len(devices)} CPU devices; start with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={count}")
        return devices[:count]
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology_name=name, platform=platform).devices
    except Exception as error:  # noqa: BLE001 - unsupported platforms raise many kinds.
        raise ValueError(f"--topology={topology}: this jax/libtpu cannot describe it "
                         f"({type(error).__name__}: {error})") from error


def abstract_batch(config, mesh):
    """The global train batch of config.task's step, as ShapeDtypeStructs sharded over
    (data, fsdp): the fields and shapes the task's iterators yield."""
    return tasks.abstract_batch(config, partitioning.batch_sharding(mesh))


def _bytes(tree):
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


@dataclasses.dataclass
class StepToCompile:
    """A jitted step, the abstract arguments to lower it with, and what it runs over."""

    step: object  # jax.jit-ed
    args: tuple  # ShapeDtypeStructs with shardings
    mesh: jax.sharding.Mesh
    rules: tuple
    setup: object  # train/trainer.py Setup: model, optimizer, abstract state, counts
    batch_size: int  # Rows of the batch the step takes.
    facts: dict  # The task's own report fields (e.g. GRPO's reference policy).


def loop_train_step(config, devices):
    """The loop's train step (train/trainer.py) for `config`."""
    trainer = build_trainer(config, devices=devices)
    return StepToCompile(trainer.train_step,
                         (trainer.abstract_state(), abstract_batch(config, trainer.mesh)),
                         trainer.mesh, trainer.rules, trainer.setup,
                         int(config.data.batch_size), {})


def compile_train_step(config, devices=None):
    """-> (compiled step, report dict): the step a run of config.task trains with (the
    loop's, or a runner's own: `Task.step_to_compile`). Allocates no parameters,
    optimizer state or batch."""
    devices = jax.devices() if devices is None else devices
    target = (tasks.get_task(config.task).step_to_compile(config, devices)
              or loop_train_step(config, devices))
    abstract, counts = target.setup.abstract, target.setup.counts
    start = time.perf_counter()
    with jax.set_mesh(target.mesh), nn.logical_axis_rules(target.rules):
        lowered = target.step.lower(*target.args)
        lowered_s = time.perf_counter() - start
        compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lowered_s
    report = {
        "task": config.task,
        "mesh": dict(target.mesh.shape),
        "num_devices": target.mesh.size,
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "batch_size": target.batch_size,
        "seq_len": int(config.data.seq_len),
        "parameters": counts["total"],
        "trainable": counts["trainable"],
        "param_bytes": _bytes(abstract.params),
        "optimizer_state_bytes": counts["optimizer_state_bytes"],
        "state_bytes": _bytes(abstract),
        **target.facts,
        "lower_s": lowered_s,
        "compile_s": compile_s,
        "per_device": memory_figures(compiled),
    }
    return compiled, report


def memory_figures(compiled):
    """XLA's per-device byte counts for a compiled step (None where it won't say)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    figures = {name: int(getattr(analysis, f"{name}_size_in_bytes", 0) or 0) for name in (
        "argument", "output", "alias", "temp", "generated_code")}
    figures = {f"{k}_bytes": v for k, v in figures.items()}
    # Donated state is both argument and output: counted once. An upper bound on the
    # step's footprint; XLA's own peak (where the backend computes one) may be lower.
    figures["total_bytes"] = (figures["argument_bytes"] + figures["output_bytes"]
                              - figures["alias_bytes"] + figures["temp_bytes"])
    figures["peak_bytes"] = memory.compiled_step_bytes(compiled)
    return figures


def compile_only(config, workdir, topology=""):
    """Compiles the train step for `topology`; writes and returns `W/compile.json`."""
    _, report = compile_train_step(config, topology_devices(topology))
    report["topology"] = topology or "current"
    # Evidence that nothing was allocated: the arrays alive now, and this process's peak.
    report["live_array_bytes"] = int(sum(x.nbytes for x in jax.live_arrays()))
    report["host_peak_rss_bytes"] = memory.host_peak_rss_bytes()
    if jax.process_index() == 0:
        atomic_write_json(os.path.join(workdir, "compile.json"), report)
    return report
