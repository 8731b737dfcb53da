"""Runs one config to completion the way every entry point does: the task's runner
(retrieval/rag_run.py, retrieval/retriever_run.py) or the train loop alone, then the
learning-curve plots beside each run's metrics. `launch.main` and both modes of
`launch.sweep` call this; nothing else decides how a task runs."""

import importlib
import inspect
import logging
import os

from train import loop, tasks
from train.experiments.learning_curves import write_learning_curves
from train.workdir_lock import WorkdirLock

log = logging.getLogger("strata")


def runner_of(task):
    """The callable `(config, workdir) -> results` that runs `task`."""
    if not task.runner:
        return loop.train_and_evaluate
    module, _, function = task.runner.partition(":")
    return getattr(importlib.import_module(module), function)


# launch.main's exit status after a preemption: the run saved and wants to be requeued
# (EX_TEMPFAIL, "try again"); Slurm's --requeue and Kubernetes' restart policies key on it.
PREEMPTED_EXIT_CODE = 75


def run(config, workdir, allow_config_change=()):
    """-> the run's results, or {"preempted_at_step": step} (saved, not finished).
    The workdir is held (`W/.lock`) for the whole run, a runner's phases included.
    `allow_config_change`: see train/resume_check.py; the loop's, and a runner's that
    takes it (the post-training runner)."""
    task = tasks.get_task(config.task)
    with WorkdirLock(workdir):
        if task.runner:
            runner = runner_of(task)
            if "allow_config_change" in inspect.signature(runner).parameters:
                results = runner(config, workdir, allow_config_change=allow_config_change)
            else:
                if allow_config_change:
                    log.warning("--allow_config_change=%s ignored: task %r's runner "
                                "does not take it (its restarts allow the safe changes "
                                "only)", ",".join(allow_config_change), task.name)
                results = runner(config, workdir)
        else:
            results = loop.train_and_evaluate(config, workdir, allow_config_change)
        if "preempted_at_step" not in results:
            for directory, _, files in os.walk(workdir):  # The run's and its sub-runs'.
                if "metrics.jsonl" in files:
                    write_learning_curves(directory)
    return results
