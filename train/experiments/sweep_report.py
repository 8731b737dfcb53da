"""A sweep's results beside its runs: `results.csv`, `results.md` and PNG plots.

Every trial's `results.json` becomes a CSV row (its overrides, seed and metrics
flattened: `validation/accuracy`, `parameters/trainable`, `peak_memory/...`,
`forgetting/increase`); the Markdown table groups trials that differ only in their seed
and shows mean ± sample standard deviation (ddof=1) over the seeds. The best group is
chosen on the sweep's metric (on the validation split, by mean over seeds) and reported
with its test score. A sweep with a search space also gets `best_so_far.png`: the best
metric found after each trial, in the order trials were drawn (asked, for a bayes search).

`write_search_comparison` reports random against bayes search over the same space at
equal trial counts (launch/sweep.py --compare_searches): best-so-far against trials,
mean and spread over search seeds, and a permutation test of the difference.
"""

import csv
import itertools
import math
import os

import numpy as np

from train.experiments.sweeps import format_value, short_names, split_name
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


# --- Searches: best so far against trials ----------------------------------------------


def best_so_far(values, mode):
    """[the best of values[:k + 1] for each k]: NaN until the first finite value; a
    failed trial (NaN) keeps the best before it."""
    best, curve = math.nan, []
    for value in values:
        value = float(value) if isinstance(value, (int, float)) else math.nan
        if math.isfinite(value) and not (math.isfinite(best) and (
                value <= best if mode == "max" else value >= best)):
            best = value
        curve.append(best)
    return curve


def search_curves(groups, spec):
    """{grid point label: best-so-far of the mean metric over each parameter set's seeds,
    one value a parameter set in trial order} ("all" without a grid)."""
    grid = [short_names(spec.keys)[k] for k in spec.grid]
    values = {}
    for _, overrides, rows, _ in groups:
        label = ",".join(f"{k}={format_value(overrides[k])}" for k in grid) or "all"
        values.setdefault(label, []).append(mean_std([r.get(spec.metric) for r in rows])[0])
    return {label: best_so_far(v, spec.mode) for label, v in values.items()}


def plot_best_so_far(path, groups, spec):
    """Best metric so far against trials, one line a grid point; None without a
    search space."""
    if not spec.random or spec.num_trials < 2:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, curve in search_curves(groups, spec).items():
        axis.plot(range(1, len(curve) + 1), curve, "o-", markersize=3, label=label)
    axis.set_xlabel(f"trials ({spec.search} search; each the mean over its seeds)")
    axis.set_ylabel(f"best {spec.metric} so far ({spec.mode})")
    axis.grid(alpha=0.3)
    if spec.grid:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def permutation_p_value(a, b, resamples=20000, seed=0):
    """Two-sided permutation test of mean(a) - mean(b) between two independent samples
    (e.g. final best scores over search seeds): every split of the pooled values when
    there are at most `resamples`, else `resamples` random ones. With 3 against 3 the
    smallest possible p is 0.1: such a comparison cannot be significant at 0.05."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    pooled, observed = np.concatenate([a, b]), abs(a.mean() - b.mean())
    n, k = pooled.size, a.size
    if math.comb(n, k) <= resamples:
        splits = [list(c) for c in itertools.combinations(range(n), k)]
    else:
        rng = np.random.default_rng(seed)
        splits = [rng.permutation(n)[:k] for _ in range(resamples)]
    total = pooled.sum()
    differences = [abs(pooled[s].mean() - (total - pooled[s].sum()) / (n - k))
                   for s in splits]
    return float(np.mean(np.asarray(differences) >= observed - 1e-12))


def write_search_comparison(workdir, spec, curves, plots=True):
    """`search_comparison.md` (and `.png`) in `workdir`: best-so-far of spec.metric
    against trials for each search, over search seeds. `curves`: {search name: {search
    seed: [best so far after each trial]}}, every curve num_trials long. Returns
    {"markdown": path, "plot": path or None, "final": {search: [final best a seed]},
    "p_value": the permutation test of the final bests (two searches)}."""
    names = list(curves)
    arrays = {n: np.array([curves[n][s] for s in sorted(curves[n])], np.float64)
              for n in names}
    trials = arrays[names[0]].shape[1]
    counts = sorted({k for k in (1, 2, 3, 5, 8, 12, 16, 24, 32, 48, 64) if k < trials}
                    | {spec.startup_trials, trials} - {0})
    seeds = {n: sorted(curves[n]) for n in names}
    lines = [f"# {' vs '.join(names)} search: best {spec.metric} so far against trials", "",
             f"Same space ({', '.join(spec.random)}), {trials} trials a search, search seeds "
             + "; ".join(f"{n}: {seeds[n]}" for n in names)
             + f". Cells: mean ± sample std over the search seeds (min–max in brackets) of "
             f"the best {spec.metric} ({spec.mode}) after that many trials. TPE's first "
             f"{spec.startup_trials} trials are random draws.", "",
             "| trials | " + " | ".join(names) + " | difference (" + " − ".join(
                 reversed(names)) + ") | permutation p |",
             "|---:|" + "---:|" * (len(names) + 2)]
    final = {n: arrays[n][:, -1].tolist() for n in names}
    p_value = None
    for k in counts:
        cells = []
        for n in names:
            column = arrays[n][:, k - 1]
            mean, std = mean_std(column.tolist())
            cells.append(f"{mean:.4f} ± {std:.4f} [{np.nanmin(column):.4f}–"
                         f"{np.nanmax(column):.4f}]")
        if len(names) == 2:
            a, b = arrays[names[1]][:, k - 1], arrays[names[0]][:, k - 1]
            p = permutation_p_value(a, b)
            cells += [f"{a.mean() - b.mean():+.4f}", f"{p:.2f}"]
            p_value = p
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if len(names) == 2:
        a, b = names[1], names[0]
        difference = np.mean(final[a]) - np.mean(final[b])
        better = (difference > 0) == (spec.mode == "max")
        standing = ("level with" if difference == 0 else "ahead of" if better else "behind")
        lines += ["", f"After {trials} trials {a} is {standing} {b} by {abs(difference):.4f} "
                  f"in mean best {spec.metric}; "
                  + (f"significant at 0.05 (p = {p_value:.2f})." if p_value < 0.05 else
                     f"not significant (p = {p_value:.2f}, two-sided permutation test over "
                     f"the search seeds).")]
    plot = None
    if plots:
        plot = plot_search_comparison(os.path.join(workdir, "search_comparison.png"), spec,
                                      arrays)
        lines += ["", "![best so far against trials](search_comparison.png)"]
    path = os.path.join(workdir, "search_comparison.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"markdown": path, "plot": plot, "final": final, "p_value": p_value}


def plot_search_comparison(path, spec, arrays):
    """Mean best-so-far against trials per search, the band its min–max over seeds."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, array in arrays.items():
        x = np.arange(1, array.shape[1] + 1)
        line, = axis.plot(x, np.nanmean(array, 0), "o-", markersize=3,
                          label=f"{name} (mean of {array.shape[0]} search seeds)")
        axis.fill_between(x, np.nanmin(array, 0), np.nanmax(array, 0), alpha=0.2,
                          color=line.get_color())
    if spec.startup_trials:
        axis.axvline(spec.startup_trials + 0.5, color="grey", linestyle=":",
                     label="TPE starts modelling")
    axis.set_xlabel("trials")
    axis.set_ylabel(f"best {spec.metric} so far ({spec.mode})")
    axis.set_title("Mean over search seeds; band: min–max", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
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
        "learning_curves.png", "metric_vs_parameters.png", "metric_vs_label_fraction.png",
        "best_so_far.png")]
    if plots:
        paths = [plot_learning_curves(paths[0], workdir, groups, spec, best),
                 plot_metric_vs_parameters(paths[1], groups, spec, best),
                 plot_metric_vs_label_fraction(paths[2], groups, spec, best),
                 plot_best_so_far(paths[3], groups, spec)]
    outputs["plots"] = [p for p in paths if p and os.path.exists(p)]
    outputs["markdown"] = write_markdown(os.path.join(workdir, "results.md"), groups, spec,
                                         rows, test_split,
                                         [os.path.basename(p) for p in outputs["plots"]])
    return outputs
