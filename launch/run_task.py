"""Runs one config to completion the way every entry point does: the task's runner
(retrieval/rag_run.py, retrieval/retriever_run.py) or the train loop alone, then the
learning-curve plots beside each run's metrics. `launch.main` and both modes of
`launch.sweep` call this; nothing else decides how a task runs."""

import importlib
import os

from train import loop, tasks
from train.experiments.learning_curves import write_learning_curves


def runner_of(task):
    """The callable `(config, workdir) -> results` that runs `task`."""
    if not task.runner:
        return loop.train_and_evaluate
    module, _, function = task.runner.partition(":")
    return getattr(importlib.import_module(module), function)


def run(config, workdir):
    """-> the run's results, or {"preempted_at_step": step} (saved, not finished)."""
    results = runner_of(tasks.get_task(config.task))(config, workdir)
    if "preempted_at_step" not in results:
        for directory, _, files in os.walk(workdir):  # The run's and a runner's sub-runs.
            if "metrics.jsonl" in files:
                write_learning_curves(directory)
    return results
