"""A sweep's results beside its runs: `results.csv`, `results.md` and PNG plots.

Every trial's `results.json` becomes a CSV row (its overrides, seed and metrics
flattened: `validation/accuracy`, `parameters/trainable`, `peak_memory/...`,
`forgetting/increase`); the Markdown table groups trials that differ only in their seed
and shows mean ± sample standard deviation (ddof=1) over the seeds. The best group is
chosen on the sweep's metric (on the validation split, by mean over seeds) and reported
with its test score.
"""

import csv
import math
import os
import re

import numpy as np

from train.experiments.sweeps import format_value, short_names
from train.metrics_log import read_metrics
from train.run_record import read_results

# Order of the metric columns by their first path component; the rest follow, sorted.
_COLUMN_RANK = ("step", "train_time_s", "parameters", "peak_memory", "data", "forgetting")
_SKIPPED = ("by_module", "checkpoint")  # Per-module counts; a path, not a measurement.


def flatten_results(results):
    """results.json -> {"validation/accuracy": ..., "parameters/trainable_percent": ...}."""
    flat = {}
    # A sliced split (`validation[:512]`, tfds syntax) reports under its split's name.
    results = {split_name(k): v for k, v in results.items()}

    def visit(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                if key not in _SKIPPED:
                    visit(f"{prefix}/{key}" if prefix else key, inner)
        elif isinstance(value, (bool, int, float, str)) or value is None:
            flat[prefix] = value

    visit("", results)
    total, trainable = flat.get("parameters/total"), flat.get("parameters/trainable")
    if total and trainable is not None:
        flat["parameters/trainable_percent"] = 100.0 * trainable / total
    return flat


def split_name(split):
    return re.sub(r"\[[^\]]*\]$", "", split)


def collect_rows(workdir, trials, failed=()):
    """One row per trial, in trial order: `trial`, `status` (done | failed | pending),
    the overrides by short name, `seed`, then the flattened results (done trials)."""
    short = short_names({k: None for t in trials for k in t.overrides})
    rows = []
    for trial in trials:
        row = {"trial": trial.name}
        results = read_results(os.path.join(workdir, trial.name, "results.json"))
        if results is not None:  # Complete: an empty or half-written file is not done.
            results = flatten_results(results)
            row["status"] = "done"
        else:
            results = {}
            row["status"] = "failed" if trial.name in failed else "pending"
        row.update({short[k]: v for k, v in trial.overrides.items()})
        row["seed"] = trial.seed
        row.update(results)
        rows.append(row)
    return rows


def _metric_columns(rows, identity):
    keys = {k for row in rows for k in row if k not in identity}

    def rank(key):
        first = key.split("/")[0]
        # Split metrics (validation/..., test/...) first, then _COLUMN_RANK, then the rest.
        if first not in _COLUMN_RANK and "/" in key and not key.startswith("forgetting"):
            return (0, key)
        return (1 + (_COLUMN_RANK.index(first) if first in _COLUMN_RANK else 99), key)

    return sorted(keys, key=rank)


def write_csv(path, rows, trials):
    identity = ["trial", "status", *short_names(
        {k: None for t in trials for k in t.overrides}).values(), "seed"]
    columns = identity + _metric_columns(rows, set(identity))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return path


# --- Groups: the trials that differ only in their seed ---------------------------------


def group_rows(rows, trials):
    """[(label, overrides {short name: value}, [done rows], [trial names])] in the order
    of each group's first trial."""
    short = short_names({k: None for t in trials for k in t.overrides})
    groups = {}
    for row, trial in zip(rows, trials):
        if trial.group not in groups:
            overrides = {short[k]: v for k, v in trial.overrides.items()}
            label = ",".join(f"{k}={format_value(v)}" for k, v in overrides.items())
            groups[trial.group] = (label or "all", overrides, [], [])
        if row["status"] == "done":
            groups[trial.group][2].append(row)
        groups[trial.group][3].append(trial.name)
    return list(groups.values())


def mean_std(values):
    """(mean, sample std with ddof=1; 0.0 for a single value) of the finite numbers."""
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), std


def best_group(groups, metric, mode):
    """Index of the group with the best mean `metric` over its seeds (None if none ran)."""
    scored = [(mean_std([r.get(metric) for r in rows])[0], i)
              for i, (_, _, rows, _) in enumerate(groups) if rows]
    scored = [(m, i) for m, i in scored if math.isfinite(m)]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda s: s[0])[1]


# --- Markdown ---------------------------------------------------------------------------


def _cell(values, digits=4, scale=1.0):
    mean, std = mean_std(values)
    if not math.isfinite(mean):
        return "–"
    n = sum(isinstance(v, (int, float)) for v in values)
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if n > 1 else "")


def markdown_table(groups, spec, test_split="test", best=None):
    """The grouped table: overrides, seeds, metrics as mean ± std over seeds."""
    split, name = spec.metric.split("/")
    test_metric = f"{test_split}/{name}"
    metrics = list(dict.fromkeys([spec.metric, test_metric] + [
        f"{s}/{m}" for s in (split, test_split) for m in ("accuracy", "macro_f1")]))
    all_rows = [r for _, _, rows, _ in groups for r in rows]
    metrics = [m for m in metrics if any(m in r for r in all_rows)]
    override_names = list(dict.fromkeys(k for _, overrides, _, _ in groups for k in overrides))
    forgetting = any("forgetting/increase" in r for r in all_rows)
    header = [*override_names, "seeds", *metrics, "trainable (% of total)",
              "train time (s)", "peak memory (MB)"]
    if forgetting:
        header.append("forgetting (MLM loss increase)")
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < len(override_names) else "---:"
                            for i in range(len(header))) + "|"]
    for i, (_, overrides, rows, _) in enumerate(groups):
        trainable, percent = (mean_std([r.get(k) for r in rows])[0]
                              for k in ("parameters/trainable",
                                        "parameters/trainable_percent"))
        cells = [format_value(overrides.get(k, "")) for k in override_names]
        cells.append(str(len(rows)))
        cells += [_cell([r.get(m) for r in rows]) for m in metrics]
        cells.append(f"{trainable:,.0f} ({percent:.2f}%)" if math.isfinite(trainable)
                     else "–")
        cells.append(_cell([r.get("train_time_s") for r in rows], digits=1))
        cells.append(_cell([r.get("peak_memory/compiled_step_bytes") for r in rows],
                           digits=1, scale=1e-6))
        if forgetting:
            cells.append(_cell([r.get("forgetting/increase") for r in rows]))
        if i == best:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path, groups, spec, rows, test_split="test", plots=()):
    best = best_group(groups, spec.metric, spec.mode)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "pending")}
    lines = [f"# Sweep results: {os.path.basename(os.path.dirname(os.path.abspath(path)))}",
             "",
             f"{len(rows)} trials: {counts['done']} done, {counts['failed']} failed, "
             f"{counts['pending']} pending. Mean ± sample std (ddof=1) over the seeds "
             f"of each row; one value where a row has one seed. Every trial's numbers are "
             f"in `results.csv`.", "",
             markdown_table(groups, spec, test_split, best), ""]
    if best is not None:
        label, _, best_rows, _ = groups[best]
        name = spec.metric.split("/")[1]
        lines += [f"**Best** (by mean {spec.metric}, {spec.mode}): `{label}` — "
                  f"{spec.metric} {_cell([r.get(spec.metric) for r in best_rows])}, "
                  f"{test_split}/{name} "
                  f"{_cell([r.get(f'{test_split}/{name}') for r in best_rows])}.", ""]
    lines += [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# --- Plots ------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # Files only: no display on servers and CI.
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(path, workdir, groups, spec, best=None):
    """Train loss and eval metric against step, every trial; one colour per group."""
    plt = _pyplot()
    name = spec.metric.split("/")[1]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.get_cmap("tab20" if len(groups) > 10 else "tab10")
    for g, (label, _, _, names) in enumerate(groups):
        is_best = g == best
        legend = label + (" (best)" if is_best else "")
        for trial_name in names:
            records = read_metrics(os.path.join(workdir, trial_name, "metrics.jsonl"))
            for axis, key in zip(axes, ("train/loss", f"eval/{name}")):
                points = [(r["step"], r[key]) for r in records
                          if isinstance(r.get(key), (int, float))]
                if not points:
                    continue
                steps, values = zip(*points)
                axis.plot(steps, values, "-" if key.startswith("train") else "o-",
                          color=colours(g % 20), label=legend, markersize=3,
                          linewidth=2.8 if is_best else 1.0, alpha=1.0 if is_best else 0.7,
                          zorder=3 if is_best else 2)
                legend = None  # One legend entry per group.
    for axis, ylabel in zip(axes, ("train loss", f"eval {name}")):
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    if 0 < len(groups) <= 20 and axes[0].lines:
        axes[0].legend(fontsize=7)
    figure.suptitle(f"Learning curves of every trial (thick: the best by {spec.metric})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_metric_vs_parameters(path, groups, spec, best=None):
    """Sweep metric (mean ± std over seeds) against trainable parameters, log x."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for i, (label, _, rows, _) in enumerate(groups):
        x = mean_std([r.get("parameters/trainable") for r in rows])[0]
        y, err = mean_std([r.get(spec.metric) for r in rows])
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        is_best = i == best
        axis.errorbar([x], [y], yerr=[err], fmt="*" if is_best else "o",
                      color="crimson" if is_best else "tab:blue",
                      markersize=14 if is_best else 6, capsize=3, zorder=3 if is_best else 2)
        # Staggered: settings with equal parameter counts and scores would overprint.
        axis.annotate(label + (" (best)" if is_best else ""), (x, y), fontsize=7,
                      xytext=(4, 4 - 9 * (i % 4)), textcoords="offset points")
    axis.set_xscale("log")
    axis.margins(x=0.3)  # Room for the labels of the rightmost points.
    axis.set_xlabel("trainable parameters")
    axis.set_ylabel(spec.metric)
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_metric_vs_label_fraction(path, groups, spec, best=None):
    """Sweep metric against the label fraction, one line per setting of the other
    overrides; None (no plot) when the label fraction does not vary."""
    fractions = {r.get("data/label_fraction") for _, _, rows, _ in groups for r in rows}
    if len(fractions - {None}) < 2:
        return None
    plt = _pyplot()
    series = {}
    for i, (_, overrides, rows, _) in enumerate(groups):
        rest = ",".join(f"{k}={format_value(v)}" for k, v in overrides.items()
                        if k != "label_fraction") or spec.metric
        x = mean_std([r.get("data/label_fraction") for r in rows])[0]
        y, err = mean_std([r.get(spec.metric) for r in rows])
        if math.isfinite(x) and math.isfinite(y):
            series.setdefault(rest, []).append((x, y, err, i == best))
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        points.sort()
        xs, ys, errs, bests = zip(*points)
        axis.errorbar(xs, ys, yerr=errs, fmt="o-", capsize=3, label=label)
        for x, y, _, is_best in points:
            if is_best:
                axis.plot([x], [y], "*", color="crimson", markersize=16, zorder=4,
                          label="best")
    axis.set_xscale("log")
    axis.set_xlabel("label fraction (of the training split)")
    axis.set_ylabel(spec.metric)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(workdir, spec, trials, failed=(), test_split="test", plots=True):
    """results.csv, results.md and (with `plots`) the PNG plots in `workdir`; returns
    their paths. Without `plots` (a progress update during a sweep: seconds cheaper) the
    Markdown still links the plots from the last full report."""
    test_split = split_name(test_split)
    rows = collect_rows(workdir, trials, failed)
    groups = group_rows(rows, trials)
    best = best_group(groups, spec.metric, spec.mode)
    outputs = {"csv": write_csv(os.path.join(workdir, "results.csv"), rows, trials)}
    paths = [os.path.join(workdir, name) for name in (
        "learning_curves.png", "metric_vs_parameters.png", "metric_vs_label_fraction.png")]
    if plots:
        paths = [plot_learning_curves(paths[0], workdir, groups, spec, best),
                 plot_metric_vs_parameters(paths[1], groups, spec, best),
                 plot_metric_vs_label_fraction(paths[2], groups, spec, best)]
    outputs["plots"] = [p for p in paths if p and os.path.exists(p)]
    outputs["markdown"] = write_markdown(os.path.join(workdir, "results.md"), groups, spec,
                                         rows, test_split,
                                         [os.path.basename(p) for p in outputs["plots"]])
    return outputs
