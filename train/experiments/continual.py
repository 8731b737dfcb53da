"""Continual fine-tuning (task "multitask" with config.continual, configs/continual.py):
the tasks of config.data.tasks arrive one after another; after each, every task is
evaluated on test.

One backbone is fine-tuned throughout, with one head per task (model/multitask.py: a
task's head only ever gets gradient from its own rows), so what is forgotten is what the
shared weights lose. Mitigations (config.continual.methods), each phase starting from
the previous phase's weights (init_from):

  naive   train on the new task only
  replay  + a buffer of config.data.replay_fraction of each earlier task's training
          examples, config.data.replay_share of every batch's rows on average
  l2sp    + L2-SP toward the previous weights: l2/2 ||θ − θ_prev||² (train/regularizers.py)
  ewc     + EWC: λ/2 Σ F (θ − θ_prev)², F the diagonal Fisher of the earlier tasks at their
          end, summed (train/ewc.py)

  W/pretrain/                         the masked-LM backbone (continual.pretrain)
  W/seed=s/phase0_<task>/             the first task (the same for every method)
  W/seed=s/<method>/phase<i>_<task>/  task i (i >= 1); ewc: fisher_<i-1>.npz beside
  W/results.json, W/report.md, W/first_task_accuracy.png

config.continual.phases = k > 0 trains only the first k tasks of the sequence.

Accuracy matrix R[i, j]: test accuracy on task j after training task i (0-based, T tasks).
  Average accuracy      A = 1/T Σ_j R[T-1, j]
  Average forgetting    F = 1/(T-1) Σ_{j<T-1} max_{l ∈ [j, T-2]} R[l, j] − R[T-1, j]
                        (Chaudhry et al. 2018, "Riemannian Walk", eq. 5-6: the drop from
                        the best accuracy the task had after it was learned to the end)
  Backward transfer     BWT = 1/(T-1) Σ_{j<T-1} R[T-1, j] − R[j, j]
                        (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory", eq. 2)
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from train import ewc, model_setup, tasks
from train.data import tokenizer as tokenizers
from train.data.records import Subset
from train.experiments import statistics
from train.experiments.multitask import Preempted, pretrain, run_phase, sub_config, task_accuracies
from train.init_from import load_params
from train.param_rules import path_string
from train.run_files import atomic_write_text, write_results

log = logging.getLogger("strata")

METHODS = ("naive", "replay", "l2sp", "ewc")
# L2-SP / EWC anchor every leaf at the previous weights, heads included: no leaf is
# "fresh" (a pattern that matches no path).
NOTHING = r"(?!)"


def average_accuracy(r):
    return float(np.mean(r[-1]))


def forgetting_per_task(r):
    """f_j = max_{l ∈ [j, T-2]} R[l, j] − R[T-1, j] for every task j < T-1."""
    r = np.asarray(r, np.float64)
    last = r.shape[0] - 1
    return np.array([r[j:last, j].max() - r[last, j] for j in range(last)])


def average_forgetting(r):
    """Chaudhry et al. 2018: the mean of `forgetting_per_task` (0 for one task)."""
    f = forgetting_per_task(r)
    return float(f.mean()) if f.size else 0.0


def backward_transfer(r):
    """Lopez-Paz & Ranzato 2017: mean over j < T-1 of R[T-1, j] − R[j, j]."""
    r = np.asarray(r, np.float64)
    last = r.shape[0] - 1
    if not last:
        return 0.0
    return float(np.mean([r[last, j] - r[j, j] for j in range(last)]))


def phase_config(config, method, i, seed, init_from, fisher=""):
    """The loop config of phase i (task data.tasks[i]) under `method`."""
    names, cont = tuple(config.data.tasks), config.continual
    fields = {"seed": seed, "init_from": init_from, "data.train_tasks": (names[i],),
              "data.shuffle_buffer_seed": seed}  # The replay buffer's draw too.
    if i and method == "replay":
        fields["data.replay_tasks"] = names[:i]
    elif i and method == "l2sp":
        fields.update({"optim.l2_strength": float(cont.l2sp_strength),
                       "optim.regularize_toward": "init",
                       "optim.regularize_fresh": NOTHING})
    elif i and method == "ewc":
        fields.update({"optim.ewc_strength": float(cont.ewc_strength),
                       "optim.ewc_fisher": fisher})
    return sub_config(config, **fields)


def fisher_file(config, phase_dir, task_index, seed, previous, path):
    """Writes the diagonal Fisher of task `task_index` at `phase_dir`'s final weights
    (+ the `previous` file: online EWC) to `path`, unless it exists; -> path."""
    if os.path.exists(path):
        return path
    phase = phase_config(config, "naive", task_index, seed, "")
    task = tasks.loop_task(phase.task)
    source = task.load_split(phase.data, phase.data.train_split)
    n = min(len(source), int(config.continual.fisher_examples))
    batches = task.eval_iterator(Subset(source, np.arange(n)),
                                 tokenizers.get_tokenizer(phase.data), phase.data)
    model = model_setup.build_model(phase)
    flat, _ = load_params(phase_dir)
    abstract = model_setup.abstract_params(model, phase.data.seq_len)
    params = jax.tree_util.tree_map_with_path(
        lambda p, _: np.asarray(flat[path_string(p)]), abstract)
    log.info("EWC: Fisher of %s on %d examples at %s", phase.data.tasks[task_index], n,
             phase_dir)
    fisher = ewc.diagonal_fisher(ewc.classification_log_likelihood(model), params, batches)
    return ewc.save_fisher(path, fisher, previous)


def run_sequence(config, workdir, method, seed, init_from, first_dir, first, phases):
    """Phases 1..phases-1 of `method` after the shared phase 0; -> the accuracy rows
    [phases][T] (every task tested after each phase, trained or not)."""
    names = tuple(config.data.tasks)
    rows, previous_dir, fisher = [first], first_dir, ""
    for i in range(1, phases):
        directory = os.path.join(workdir, f"seed={seed}", method, f"phase{i}_{names[i]}")
        if method == "ewc":
            fisher = fisher_file(config, previous_dir, i - 1, seed, fisher or None,
                                 os.path.join(workdir, f"seed={seed}", method,
                                              f"fisher_{i - 1}.npz"))
        results = run_phase(phase_config(config, method, i, seed, previous_dir, fisher),
                            directory)
        rows.append(results)
        previous_dir = directory
    accuracies = [task_accuracies(r, names) for r in rows]
    return [[a[t] for t in names] for a in accuracies]


def run(config, workdir):
    """Every seed and method; -> results (also W/results.json, report.md, the plot)."""
    cont, names = config.continual, tuple(config.data.tasks)
    unknown = set(cont.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"config.continual.methods has {sorted(unknown)}; expected from "
                         f"{METHODS}")
    phases = int(cont.get("phases", 0)) or len(names)
    if not 1 <= phases <= len(names):
        raise ValueError(f"config.continual.phases={phases}; expected 1..{len(names)} "
                         f"(the tasks of config.data.tasks trained in turn; 0 = all)")
    matrices = {m: [] for m in cont.methods}
    try:
        init_from = pretrain(config, workdir)
        for seed in cont.seeds:
            first_dir = os.path.join(workdir, f"seed={seed}", f"phase0_{names[0]}")
            first = run_phase(phase_config(config, "naive", 0, seed, init_from), first_dir)
            for method in cont.methods:
                matrices[method].append(run_sequence(config, workdir, method, seed,
                                                     init_from, first_dir, first, phases))
    except Preempted as preempted:
        return preempted.results
    results = summarize(matrices, names, cont, phases)
    results["plot"] = plot_first_task(results, names,
                                      os.path.join(workdir, "first_task_accuracy.png"))
    atomic_write_text(os.path.join(workdir, "report.md"), report(results, names))
    return write_results(workdir, results)


def _summary(values):
    s = statistics.mean_sd_interval(values)
    return None if s is None else {"n": s.n, "mean": s.mean, "sd": s.sd, "low": s.low,
                                   "high": s.high}


def summarize(matrices, names, cont, phases):
    """Per method: the seeds' matrices [phases, T], their mean, and A / F / BWT per seed
    (over the `phases` trained tasks: the square R[:, :phases]) with summaries; paired
    tests of each mitigation's forgetting against naive."""
    out = {"tasks": list(names), "trained_tasks": list(names[:phases]),
           "seeds": list(cont.seeds), "methods": {},
           "interval": statistics.INTERVAL,
           "strengths": {"l2sp": float(cont.l2sp_strength), "ewc": float(cont.ewc_strength)}}
    for method, per_seed in matrices.items():
        square = [np.array(r)[:, :phases] for r in per_seed]
        metrics = {"average_accuracy": [average_accuracy(r) for r in square],
                   "average_forgetting": [average_forgetting(r) for r in square],
                   "backward_transfer": [backward_transfer(r) for r in square]}
        out["methods"][method] = {
            "matrices": per_seed, "mean_matrix": np.mean(per_seed, axis=0).tolist(),
            **metrics, **{f"{k}_summary": _summary(v) for k, v in metrics.items()}}
    if "naive" in matrices:
        naive = out["methods"]["naive"]
        for method in matrices:
            if method == "naive":
                continue
            for metric, key in (("average_forgetting", "forgetting_vs_naive"),
                                ("average_accuracy", "accuracy_vs_naive")):
                test = statistics.paired_test(naive[metric], out["methods"][method][metric])
                out["methods"][method][key] = {
                    "difference": test.mean_difference, "p_value": test.p_value,
                    "test": statistics.format_test(test)}
    return out


def plot_first_task(results, names, path):
    """Accuracy on the first task after each phase, per method (mean ± sd over seeds)."""
    import matplotlib

    matplotlib.use("Agg")  # Files only: no display on servers and CI.
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.8))
    trained = results["trained_tasks"]
    phases = np.arange(len(trained))
    for method, entry in results["methods"].items():
        first = np.array(entry["matrices"])[:, :, 0] * 100  # [seeds, phases]
        mean, sd = first.mean(0), first.std(0, ddof=1) if len(first) > 1 else 0 * phases
        axis.plot(phases, mean, "o-", label=method)
        axis.fill_between(phases, mean - sd, mean + sd, alpha=0.15)
    axis.set_xticks(phases, [f"after {n}" for n in trained])
    axis.set_ylabel(f"test accuracy on {names[0]} (%)")
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(f"First task as later tasks arrive ({len(results['seeds'])} seeds, ± sd)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _format(summary, unit=" pt"):
    if summary is None:
        return "–"
    return statistics.format_summary(statistics.Summary(confidence=0.95, **summary),
                                     scale=100, digits=1, unit=unit)


def report(results, names):
    n, trained = len(results["seeds"]), results["trained_tasks"]
    lines = [f"# Continual fine-tuning: {' → '.join(trained)}", "",
             f"Over {n} seed{'s' if n > 1 else ''}: mean ± sd [95% {results['interval']}]. "
             f"A = final average accuracy, F = average forgetting (Chaudhry et al. 2018), "
             f"BWT = backward transfer (Lopez-Paz & Ranzato 2017); A and F against naive "
             f"by a paired t-test over seeds. L2-SP strength {results['strengths']['l2sp']}, "
             f"EWC λ {results['strengths']['ewc']}.", "",
             "| method | A | F | BWT | A vs naive | F vs naive |", "|---|---|---|---|---|---|"]

    def versus(entry, key):
        vs = entry.get(key)
        return "–" if vs is None else (f"{100 * vs['difference']:+.1f} pt, {vs['test']}"
                                       if vs["difference"] is not None else vs["test"])
    for method, e in results["methods"].items():
        lines.append(f"| {method} | {_format(e['average_accuracy_summary'], '%')} | "
                     f"{_format(e['average_forgetting_summary'])} | "
                     f"{_format(e['backward_transfer_summary'])} | "
                     f"{versus(e, 'accuracy_vs_naive')} | {versus(e, 'forgetting_vs_naive')} |")
    lines += ["", "Mean accuracy matrices R[i, j] (%): row = after training task i, "
              "column = tested on task j (a task not trained yet: its untrained head).", ""]
    for method, e in results["methods"].items():
        lines += [f"**{method}**", "", "| after \\ on | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for i, row in enumerate(e["mean_matrix"]):
            lines.append(f"| {trained[i]} | " + " | ".join(f"{100 * v:.1f}" for v in row)
                         + " |")
        lines.append("")
    lines.append(f"![first task]({os.path.basename(results['plot'])})")
    return "\n".join(lines) + "\n"
