"""Multi-task fine-tuning vs one model per task (task "multitask" with config.study,
configs/multitask.py): the runner, its table and its report.

  W/pretrain/            the masked-LM backbone (config.study.pretrain; skipped if empty)
  W/single/<task>/seed=s one model per task: its own adapters + head (and backbone, with
                         study.backbone="full"), `steps_per_task` steps
  W/multi/seed=s         one model, every task's slot, trained on the mixture for
                         `steps_per_task` x tasks steps (as many examples of each task)
  W/results.json, W/report.md

Every sub-run is the plain loop (train/loop.py) in its own directory, so an interrupted
study resumes: finished runs (results.json) are read, an unfinished one resumes from its
checkpoint. The helpers here (sub-configs, phases, the pre-training) are shared with
train/experiments/continual.py.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from train import loop, model_setup
from train.experiments import statistics
from train.param_rules import path_string
from train.run_files import atomic_write_text, write_results

log = logging.getLogger("strata")

# Routed (per-task) parameters: model/multitask.py's modules with a leading task axis.
ROUTED = ("classify_head/", "_adapter/")


class Preempted(Exception):
    """A sub-run saved and stopped on preemption; the study stops there too."""

    def __init__(self, results):
        super().__init__(f"preempted at step {results['preempted_at_step']}")
        self.results = results


def sub_config(config, **fields):
    """A "multitask" loop config from the study's: `fields` ("data.train_tasks": ...)
    set, the study's own sections dropped."""
    sub = config.copy_and_resolve_references()
    with sub.unlocked():
        for section in ("study", "continual"):
            if section in sub:
                del sub[section]
        sub.task = "multitask"
        for dotted, value in fields.items():
            *parents, key = dotted.split(".")
            node = sub
            for p in parents:
                node = node[p]
            node[key] = value
    return sub


def run_phase(config, workdir):
    """The loop on `config` in `workdir`; a finished run's results.json is read instead.
    A preemption raises `Preempted` (the study returns it: requeue to resume)."""
    path = os.path.join(workdir, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    log.info("Training %s", workdir)
    results = loop.train_and_evaluate(config, workdir)
    if "preempted_at_step" in results:
        raise Preempted(results)
    return results


def pretrain(config, workdir):
    """-> the init_from every sub-run starts from: W/pretrain after training
    config.study.pretrain (or config.continual.pretrain) there, else config.init_from."""
    section = config.get("study") or config.get("continual")
    spec = section.get("pretrain") if section else None
    if not spec:
        return config.init_from
    directory = os.path.join(workdir, "pretrain")
    run_phase(spec, directory)
    return directory


def task_accuracies(results, tasks, split="test"):
    """{task: accuracy} of a multitask run's results.json on `split`."""
    return {t: results[split][f"accuracy/{t}"] for t in tasks
            if f"accuracy/{t}" in results[split]}


def routed_parameter_counts(config):
    """{"total", "routed", "per_task", "shared"} of `config`'s model, counted abstractly:
    routed = the parameters with a leading task axis (every task's adapters and head)."""
    model = model_setup.build_model(config)
    params = model_setup.abstract_params(model, config.data.seq_len)
    total = routed = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        size = int(np.prod(leaf.shape))
        total += size
        if any(part in path_string(path) for part in ROUTED):
            routed += size
    tasks = max(int(config.model.num_tasks), 1)
    return {"total": total, "routed": routed, "per_task": routed // tasks,
            "shared": total - routed}


def single_task_config(config, task, seed, init_from):
    """One model for `task` alone (one slot), `steps_per_task` steps."""
    classes = dict(zip(config.data.tasks, config.model.task_classes))[task]
    return sub_config(config, **{
        "seed": seed, "init_from": init_from, "data.tasks": (task,), "data.train_tasks": (),
        "model.num_tasks": 1, "model.task_classes": (classes,), "model.num_classes": classes,
        "train.num_steps": int(config.study.steps_per_task)})


def run(config, workdir):
    """Task "multitask"'s runner: the study config.study or config.continual holds
    (train/experiments/continual.py), else the plain loop."""
    if "continual" in config:
        from train.experiments import continual  # It builds on this module.

        return continual.run(config, workdir)
    if "study" in config:
        return run_study(config, workdir)
    return loop.train_and_evaluate(config, workdir)


def run_study(config, workdir):
    """The study: pre-training, then per seed one model per task and the multi-task
    model; -> results (also W/results.json, W/report.md)."""
    study, tasks = config.study, tuple(config.data.tasks)
    try:
        init_from = pretrain(config, workdir)
        runs = {"single": {t: [] for t in tasks}, "multi": []}
        for seed in study.seeds:
            for t in tasks:
                sub = single_task_config(config, t, seed, init_from)
                result = run_phase(sub, os.path.join(workdir, "single", t, f"seed={seed}"))
                runs["single"][t].append(result)
            sub = sub_config(config, seed=seed, init_from=init_from)
            runs["multi"].append(run_phase(sub, os.path.join(workdir, "multi",
                                                             f"seed={seed}")))
    except Preempted as preempted:
        return preempted.results
    counts = {"single": {t: routed_parameter_counts(single_task_config(config, t, 0, ""))
                         for t in tasks},
              "multi": routed_parameter_counts(sub_config(config))}
    results = summarize(runs, counts, tasks, study)
    atomic_write_text(os.path.join(workdir, "report.md"), report(results, tasks))
    return write_results(workdir, results)


def summarize(runs, counts, tasks, study):
    """The study's numbers: per-task test accuracy per seed, their summaries and the
    paired single-vs-multi tests; parameters stored and the cost of adding a task."""
    accuracy = {"single": {t: [task_accuracies(r, (t,))[t] for r in runs["single"][t]]
                           for t in tasks},
                "multi": {t: [task_accuracies(r, tasks)[t] for r in runs["multi"]]
                          for t in tasks}}
    per_task = {}
    for t in tasks:
        single, multi = accuracy["single"][t], accuracy["multi"][t]
        test = statistics.paired_test(single, multi)
        per_task[t] = {"single": single, "multi": multi,
                       "single_summary": _summary(single), "multi_summary": _summary(multi),
                       "multi_minus_single": test.mean_difference, "p_value": test.p_value,
                       "test": statistics.format_test(test)}
    steps = int(study.steps_per_task)
    frozen = study.backbone == "frozen"
    single_stored = (counts["single"][tasks[0]]["shared"] if frozen else 0) + sum(
        c["per_task"] + (0 if frozen else c["shared"]) for c in counts["single"].values())
    multi = counts["multi"]
    cost = {
        "single": {"parameters_stored": single_stored, "train_steps": steps * len(tasks),
                   "add_task_parameters": int(np.mean([
                       c["per_task"] + (0 if frozen else c["shared"])
                       for c in counts["single"].values()])),
                   "add_task_steps": steps},
        "multi": {"parameters_stored": multi["total"], "train_steps": steps * len(tasks),
                  "add_task_parameters": multi["per_task"],
                  # The mixture is retrained with the new task (as many examples of each).
                  "add_task_steps": steps * (len(tasks) + 1)},
    }
    wall = {"single": sum(r["train_time_s"] for rs in runs["single"].values() for r in rs),
            "multi": sum(r["train_time_s"] for r in runs["multi"])}
    return {"tasks": list(tasks), "seeds": list(study.seeds), "backbone": study.backbone,
            "steps_per_task": steps, "per_task": per_task, "parameters": counts,
            "cost": cost, "train_time_s": wall, "interval": statistics.INTERVAL}


def _summary(values):
    s = statistics.mean_sd_interval(values)
    return None if s is None else {"n": s.n, "mean": s.mean, "sd": s.sd, "low": s.low,
                                   "high": s.high}


def _format(summary):
    if summary is None:
        return "–"
    return statistics.format_summary(statistics.Summary(confidence=0.95, **summary),
                                     scale=100, digits=1, unit="%")


def report(results, tasks):
    """W/report.md: the accuracy table and the cost table."""
    n = len(results["seeds"])
    lines = [f"# Multi-task vs one model per task (backbone: {results['backbone']})", "",
             f"Test accuracy per task, mean ± sd [95% {results['interval']}] over {n} "
             f"seed{'s' if n > 1 else ''}; multi − single with a paired t-test over "
             f"seeds.", "",
             "| task | one model per task | multi-task | multi − single | test |",
             "|---|---|---|---|---|"]
    for t in tasks:
        row = results["per_task"][t]
        diff = row["multi_minus_single"]
        lines.append(f"| {t} | {_format(row['single_summary'])} | "
                     f"{_format(row['multi_summary'])} | "
                     f"{'–' if diff is None else f'{100 * diff:+.1f} pt'} | {row['test']} |")
    cost = results["cost"]
    lines += ["", f"Parameters and steps for {len(tasks)} tasks "
              f"({results['steps_per_task']} steps per task, batch as configured):", "",
              "| approach | parameters stored | train steps | adding a task: parameters | "
              "adding a task: steps | train time (all seeds) |", "|---|---|---|---|---|---|"]
    for name, label in (("single", "one model per task"), ("multi", "multi-task")):
        c = cost[name]
        lines.append(f"| {label} | {c['parameters_stored']:,} | {c['train_steps']:,} | "
                     f"{c['add_task_parameters']:,} | {c['add_task_steps']:,} | "
                     f"{results['train_time_s'][name]:.0f} s |")
    lines += ["", "Adding a task to the multi-task model adds one adapter set and one head "
              "(its slot); its steps assume the mixture is retrained with the new task. "
              "With a frozen backbone the slots share no trained parameter, so training "
              "the new slot alone (as many steps as one single-task model) is equivalent.",
              ""]
    return "\n".join(lines)
