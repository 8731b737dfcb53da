"""`report.md` of the stages ablation (configs/ablations/stages.py): the seeds'
comparison of training from scratch, pre-training, fine-tuning and RAG, in measured
figures, with its plots beside it.

Reads only what the runs wrote (each trial's results.json, metrics.jsonl, run.json and
the parts' wall times in ablation.json), so `--mode=collect` can redraw it any time. A
missing part or trial shows as "not run" instead of failing the report.

Over several seeds a table cell is mean ± sd [95% Student-t interval of the mean], and
each comparison the report states (pre-training's gain at each label fraction, each
method against full fine-tuning) is paired by seed and carries a two-sided paired
t-test (train/experiments/statistics.py); one with p ≥ 0.05 is written "not
significant (p = ...)", as is one with too few seeds to test, instead of a ranking.
"""

import collections
import datetime
import json
import os

import numpy as np

from train.experiments import ablations, statistics, sweep_report
from train.metrics_log import read_metrics
from train.run_record import read_results

_MB = 2 ** 20


def write_report(workdir, parts):
    """Writes `<workdir>/report.md` and its PNGs; returns the report's path."""
    runs = {part.name: _part_runs(workdir, part) for part in parts}
    record = ablations.read_record(workdir)
    sections = [
        _header(workdir, runs, record),
        _data_requirement(workdir, runs),
        _methods(workdir, runs),
        _compute(runs, record),
        _rag(runs),
        _post_training(runs),
        _search(runs),
        _lr_search(runs),
    ]
    sections.insert(1, _summary(runs, record))
    path = os.path.join(workdir, "report.md")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n\n".join(s for s in sections if s) + "\n")
    os.replace(tmp, path)
    return path


# --- Reading the runs ----------------------------------------------------------------


def _part_runs(workdir, part):
    """[(trial record from sweep.json, results.json or None, trial dir)] of one part."""
    sweep_path = os.path.join(ablations.part_dir(workdir, part), "sweep.json")
    if not os.path.exists(sweep_path):
        return []
    with open(sweep_path) as f:
        trials = json.load(f)["trials"]
    runs = []
    for trial in trials:
        trial_dir = os.path.join(ablations.part_dir(workdir, part), trial["name"])
        results = read_results(os.path.join(trial_dir, "results.json"))  # None: unfinished.
        runs.append((trial, results, trial_dir))
    return runs


def _finished(runs, part):
    return [(t, r, d) for t, r, d in runs.get(part, []) if r is not None]


def _value(results, path, default=None):
    node = results
    for key in path.split("/"):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _seeded(runs, part, key):
    """{override value: {seed: results}}, in the sweep's order: the runs a paired
    comparison matches by seed."""
    groups = {}
    for trial, results, _ in _finished(runs, part):
        groups.setdefault(trial["overrides"].get(key), {})[trial.get("seed")] = results
    return groups


def _grouped(runs, part, key):
    """{override value: [results, ...]} over seeds, in the sweep's order."""
    return {k: list(v.values()) for k, v in _seeded(runs, part, key).items()}


def _mean_std(values):
    summary = statistics.mean_sd_interval(values)
    if summary is None:
        return None, None
    return summary.mean, summary.sd or 0.0


def _cell(values, seeds, percent=True):
    """A table cell over seeds: '45.2% ± 1.3 [41.9, 48.5]' (mean ± sd [95% t-interval]);
    the bare mean when the table has one seed; 'not run'."""
    summary = statistics.mean_sd_interval(values)
    if summary is None:
        return "not run" if percent else "–"
    if percent:
        return statistics.format_summary(summary, 100, 1, "%", n_expected=seeds)
    return statistics.format_summary(summary, 1, 3, n_expected=seeds)


def _seeds(groups):
    """The most seeds any cell of a table has: what its caption states."""
    return max((len(g) for g in groups if g), default=1)


def _seeds_note(seeds):
    if seeds == 1:
        return ("One seed: no spread, interval or test is possible, so no difference "
                "below is a finding.")
    return (f"{seeds} seeds: a cell is mean ± sd [95% {statistics.INTERVAL}]; a cell "
            f"with fewer seeds says how many.")


def _comparison(baseline, other, metric="test/accuracy"):
    """'+3.1 [0.5, 5.7], p = 0.012': other - baseline in points, paired by seed (mean
    [95% t-interval]), with its two-sided paired t-test; 'not significant (...)' when
    p >= 0.05 or untestable; '–' without a pair."""
    seeds = [s for s in baseline if s in other]
    test = statistics.paired_test([_value(baseline[s], metric) for s in seeds],
                                  [_value(other[s], metric) for s in seeds])
    if test.mean_difference is None:
        return "–"
    text = f"{100 * test.mean_difference:+.1f}"
    if test.low is not None:
        text += f" [{100 * test.low:+.1f}, {100 * test.high:+.1f}]"
    return f"{text}, {statistics.format_test(test)}"


def _pct(values, digits=1):
    mean, std = _mean_std(values)
    if mean is None:
        return "not run"
    return f"{100 * mean:.{digits}f}%" + (f" ± {100 * std:.{digits}f}" if std else "")


def _num(values, digits=3):
    mean, std = _mean_std(values)
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- Sections ----------------------------------------------------------------------------


def _code_versions(runs):
    """(environment of the first run, "commit X" or, when a resumed ablation's runs came
    from several code versions, each commit with its number of runs)."""
    env, commits = {}, collections.Counter()
    for part_runs in runs.values():
        for _, _, trial_dir in part_runs:
            path = os.path.join(trial_dir, "run.json")
            if os.path.exists(path):
                with open(path) as f:
                    run = json.load(f)
                env = env or run.get("environment", {})
                code = run.get("code", {})
                commits[str(code.get("git_commit", "?"))[:10]
                        + (" (dirty)" if code.get("git_dirty") else "")] += 1
    if len(commits) <= 1:
        return env, f"commit {next(iter(commits), '?')}"
    return env, "runs from commits " + ", ".join(
        f"{commit} ({count})" for commit, count in commits.most_common())


def _header(workdir, runs, record):
    env, commits = _code_versions(runs)
    total = sum(p.get("wall_s", 0.0) for p in record["parts"].values())
    lines = [
        "# The stages compared: scratch, pre-training, fine-tuning, RAG",
        "",
        f"Written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} from `{workdir}` "
        f"(configs/ablations/stages.py). All parts took **{total / 60:.1f} min** on "
        f"{len(env.get('devices', [])) or '?'} {env.get('device_kind', '?')} device(s), "
        f"{os.cpu_count()} CPU cores; jax {env.get('jax', '?')}, flax "
        f"{env.get('flax', '?')}, {commits}.",
        "",
        _table(["part", "trials finished", "wall time"], [
            (f"`{name}`: {record['parts'].get(name, {}).get('title', '')}",
             f"{len(_finished(runs, name))}/{len(part_runs)}",
             f"{record['parts'].get(name, {}).get('wall_s', 0.0):.0f} s")
            for name, part_runs in runs.items()]),
    ]
    return "\n".join(lines)


def _label_rows(runs):
    """[(fraction, examples, scratch results, fine-tuned results)], results {seed: ...}."""
    scratch = _seeded(runs, "scratch", "data.label_fraction")
    tuned = _seeded(runs, "finetune", "data.label_fraction")
    rows = []
    for fraction in sorted(set(scratch) | set(tuned), key=float):
        any_run = next(iter((scratch.get(fraction) or tuned.get(fraction)).values()))
        rows.append((float(fraction), _value(any_run, "data/train_examples"),
                     scratch.get(fraction, {}), tuned.get(fraction, {})))
    return rows


def _format_epochs(epochs):
    return f"{epochs:.0f}" if epochs >= 10 else f"{epochs:.2g}"


def _epochs(runs, part, examples):
    """Passes over the labelled examples: steps x batch / examples (from a trial's
    config.json), or None."""
    for _, results, trial_dir in _finished(runs, part):
        path = os.path.join(trial_dir, "config.json")
        if examples and os.path.exists(path):
            with open(path) as f:
                batch = json.load(f)["data"]["batch_size"]
            return results.get("step", 0) * batch / examples
    return None


def _data_requirement(workdir, runs):
    rows = _label_rows(runs)
    if not rows:
        return "## 1. Data requirement\n\nNot run."
    epochs = _epochs(runs, "scratch", 1) or _epochs(runs, "finetune", 1)  # Examples seen.
    seeds = _seeds(g for row in rows for g in row[2:])

    def cells(results):
        results = list(results.values())
        return (_cell([_value(r, "test/accuracy") for r in results], seeds),
                _cell([_value(r, "test/macro_f1") for r in results], seeds, percent=False))

    table = _table(
        ["labels", "examples", "epochs", "scratch: test acc", "macro-F1",
         "pre-trained: test acc", "macro-F1", "gain (acc points), paired t-test"],
        [(f"{100 * f:g}%", n or "–", _format_epochs(epochs / n) if epochs and n else "–",
          *cells(s), *cells(t), _comparison(s, t)) for f, n, s, t in rows])
    plot = _plot_data_requirement(os.path.join(workdir, "data_requirement.png"), rows)
    return "\n".join([
        "## 1. Data requirement: from scratch vs pre-train then fine-tune",
        "",
        ("Same model, steps, batch and seeds; the initialisation differs (random vs "
         "the MLM checkpoint of part `pretrain`), and so may the learning rate: the "
         f"pre-trained runs at full fine-tuning's, {_LR_SELECTED} at 100% of the "
         "labels; the scratch runs at "
         + ("the rate selected the same way from random init. "
            if _lr_selected(runs, "scratch") else "its default. ")
         if _lr_selected(runs, "finetune")
         else "Same model, steps, batch and seeds; only the initialisation differs "
         "(random vs the MLM checkpoint of part `pretrain`). ")
        + "Supersense classification, 45 classes. "
        "Epochs = examples seen (steps × batch) / labelled examples: where it is below 1, "
        "more labels cannot help at this budget and differences between those rows are "
        "noise of one short run. " + _seeds_note(seeds) + " Gain: pre-trained minus "
        "scratch, paired by seed: mean [95% t-interval] and a two-sided paired t-test; "
        "*not significant* (p ≥ 0.05, or too few seeds to test) claims no difference.",
        "",
        table,
        "",
        f"![accuracy vs labels]({os.path.basename(plot)})" if plot else "",
    ])


def _plot_data_requirement(path, rows):
    plt = sweep_report._pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for index, label in ((2, "from scratch"), (3, "MLM pre-trained, fine-tuned")):
        points = [(row[0], statistics.mean_sd_interval(
            [_value(r, "test/accuracy") for r in row[index].values()])) for row in rows]
        points = [(f, s.mean, s.mean - (s.low if s.low is not None else s.mean),
                   (s.high if s.high is not None else s.mean) - s.mean)
                  for f, s in points if s is not None]
        if points:
            f, m, below, above = map(np.array, zip(*points))
            ax.errorbar(100 * f, 100 * m, yerr=100 * np.stack([below, above]), marker="o",
                        capsize=3, label=label)
    ax.set(xscale="log", xlabel="labelled training examples used (%)",
           ylabel="test accuracy (%, bars: 95% t-interval over seeds)",
           title="From scratch vs MLM pre-trained, by labels used")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _full_finetuning(runs):
    """{seed: results} of full fine-tuning: the `finetune` part's 100%-label runs."""
    full = _seeded(runs, "finetune", "data.label_fraction")
    return next((v for k, v in full.items() if float(k) == 1.0), {})


def _method_rows(runs):
    """[(label, [results over seeds])]: full fine-tuning, every method, then MiniLM."""
    return [(label, list(results.values())) for label, results, _ in _seeded_methods(runs)]


def _seeded_methods(runs):
    """[(label, {seed: results}, compared with full fine-tuning?)], the table's order."""
    rows = []
    full = _full_finetuning(runs)
    if full:
        rows.append(("full", full, False))
    for method, results in _seeded(runs, "methods", "arg.method").items():
        rows.append((str(method), results, True))
    for method, results in _seeded(runs, "minilm", "arg.method").items():
        rows.append((f"all-MiniLM-L6-v2, {method}", results, False))  # Another model.
    return rows


def _methods(workdir, runs):
    seeded = _seeded_methods(runs)
    if not seeded:
        return "## 2. Fine-tuning methods\n\nNot run."
    full, seeds = _full_finetuning(runs), _seeds(results for _, results, _ in seeded)
    table_rows = []
    for label, by_seed, compared in seeded:
        results = list(by_seed.values())
        trainable = [_value(r, "parameters/trainable") for r in results]
        total = [_value(r, "parameters/total") for r in results]
        share = [t / n for t, n in zip(trainable, total) if t and n]
        before = [_value(r, "forgetting/before/loss") for r in results]
        after = [_value(r, "forgetting/after/loss") for r in results]
        forgetting = ("–" if _mean_std(before)[0] is None else
                      f"{_num(before)} → {_num(after)}")
        table_rows.append((
            label, _cell([_value(r, "test/accuracy") for r in results], seeds),
            _cell([_value(r, "test/macro_f1") for r in results], seeds, percent=False),
            _comparison(full, by_seed) if compared and full else "–",
            f"{int(np.mean(trainable)):,} ({_pct(share, 2)})" if trainable[0] else "–",
            _num([_value(r, "train_time_s") for r in results], 0) + " s",
            _num([(_value(r, "peak_memory/compiled_step_bytes") or 0) / _MB
                  for r in results], 1) + " MB",
            forgetting))
    plot = _plot_methods(os.path.join(workdir, "methods.png"), _method_rows(runs))
    return "\n".join([
        "## 2. Fine-tuning methods (100% of the labels)",
        "",
        "From the same MLM checkpoint, same steps and batch; each method at "
        + (_LR_SELECTED if _lr_selected(runs, "methods") else "its default learning rate")
        + ". Trainable parameters include the new classification head. Step "
        "memory is XLA's compiled train-step footprint per device (arguments, outputs and "
        "temporaries; the CPU backend reports no temporaries, so on CPU it is parameters, "
        "optimizer state and the batch). Forgetting: held-out MLM loss of the encoder (under the "
        "pre-trained MLM head) before → after fine-tuning; MiniLM ships no MLM head. "
        + _seeds_note(seeds) + " vs full: the method minus full fine-tuning in test "
        "accuracy points, paired by seed: mean [95% t-interval] and a two-sided paired "
        "t-test; where it reads *not significant* the two are not ranked.",
        "",
        _table(["method", "test acc", "macro-F1", "vs full (acc points), paired t-test",
                "trainable params (% of total)",
                "train time", "step memory", "MLM loss before → after"], table_rows),
        "",
        f"![accuracy vs trainable parameters]({os.path.basename(plot)})" if plot else "",
        "",
        _pairwise(runs),
    ])


def _pairwise(runs):
    """Every pair of the encoder's methods (full fine-tuning included) in test accuracy,
    paired by seed, Holm-adjusted over all the pairs: which differences among the methods
    are findings, not only each against full fine-tuning."""
    rows = [(label, by_seed) for label, by_seed, _ in _seeded_methods(runs)
            if "MiniLM" not in label and len(by_seed) >= 2]
    if len(rows) < 3:
        return ""
    mean = {label: np.mean([_value(r, "test/accuracy") for r in by_seed.values()])
            for label, by_seed in rows}
    rows.sort(key=lambda row: -mean[row[0]])
    pairs = [(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))]
    tests = []
    for i, j in pairs:
        (_, a), (_, b) = rows[i], rows[j]
        seeds = [s for s in a if s in b]
        tests.append(statistics.paired_test([_value(b[s], "test/accuracy") for s in seeds],
                                            [_value(a[s], "test/accuracy") for s in seeds]))
    adjusted = statistics.holm([t.p_value for t in tests])
    cells = {}
    for (i, j), test, p in zip(pairs, tests, adjusted):
        if test.mean_difference is None:
            cells[i, j] = "–"
        else:
            mark = "**" if p is not None and p < statistics.ALPHA else ""
            cells[i, j] = (f"{mark}{100 * test.mean_difference:+.1f}{mark} "
                           + (f"({statistics.format_p(p)})" if p is not None
                              else f"({test.reason})"))
    labels = [label for label, _ in rows]
    significant = sum(1 for p in adjusted if p is not None and p < statistics.ALPHA)
    return "\n".join([
        "### 2b. The methods against each other",
        "",
        f"Row minus column in test accuracy points (rows and columns by mean accuracy), "
        f"paired by seed (two-sided paired t-test), the p-value Holm-adjusted over all "
        f"{len(pairs)} pairs; **bold**: significant at {statistics.ALPHA} after the "
        f"adjustment ({significant} of {len(pairs)} pairs). A plain cell does not rank the "
        f"two methods.",
        "",
        _table(["method", *labels[1:]], [
            (label, *(cells.get((i, j), "") for j in range(1, len(rows))))
            for i, label in enumerate(labels[:-1])]),
    ])


def _plot_methods(path, rows):
    plt = sweep_report._pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, results in rows:
        trainable = _mean_std([_value(r, "parameters/trainable") for r in results])[0]
        accuracy = _mean_std([_value(r, "test/accuracy") for r in results])[0]
        if trainable and accuracy is not None:
            marker = "s" if "MiniLM" in label else "o"
            ax.scatter(trainable, 100 * accuracy, marker=marker)
            ax.annotate(label.replace("all-MiniLM-L6-v2", "MiniLM"),
                        (trainable, 100 * accuracy), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="test accuracy (%)",
           title="Fine-tuning methods: quality vs trainable parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tokens_per_s(trial_dir):
    records = read_metrics(os.path.join(trial_dir, "metrics.jsonl"))
    values = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return float(np.median(values)) if values else None


def _compute(runs, record):
    pretrain = _finished(runs, "pretrain")
    supervised = [r for part in ("scratch", "finetune", "methods")
                  for _, r, _ in _finished(runs, part)]
    if not pretrain and not supervised:
        return ""
    lines = ["## 3. Compute", ""]
    rows = []
    if pretrain:
        trial, results, trial_dir = pretrain[0]
        speed = _tokens_per_s(trial_dir)
        rows.append(("MLM pre-training", f"{results.get('step', '–')} steps",
                     f"{results.get('train_time_s', 0):.0f} s",
                     f"{speed:,.0f}" if speed else "–",
                     f"{_value(results, 'validation/loss', float('nan')):.3f} MLM loss, "
                     f"{100 * _value(results, 'validation/accuracy', float('nan')):.1f}% "
                     f"masked-token accuracy"))
    for part, label in (("scratch", "from scratch (each run)"),
                        ("finetune", "full fine-tuning (each run)"),
                        ("methods", "other methods (each run)"),
                        ("minilm", "MiniLM fine-tuning (each run)")):
        done = _finished(runs, part)
        if done:
            times = [r.get("train_time_s", 0) for _, r, _ in done]
            speeds = [s for s in (_tokens_per_s(d) for _, _, d in done) if s]
            rows.append((label, f"{done[0][1].get('step', '–')} steps",
                         f"{np.mean(times):.0f} s (mean of {len(times)})",
                         f"{np.median(speeds):,.0f}" if speeds else "–", ""))
    lines.append(_table(["stage", "length", "train time", "tokens/s (median)", "outcome"],
                        rows))
    if pretrain and supervised:
        ratio = pretrain[0][1].get("train_time_s", 0) / max(
            np.mean([r.get("train_time_s", 0) for r in supervised]), 1e-9)
        lines += ["", f"Pre-training once costs about {ratio:.1f} fine-tuning runs of "
                  f"wall time here; every fine-tuning run and method above reuses it."]
    return "\n".join(lines)


RAG_PARTS = ("rag", "rag_tuned")  # Zero-shot / trained generator: one table each.


def _generator_text(generator):
    """What answered, from results.json's "generator" section."""
    if generator.get("zero_shot"):
        return (f"the chat decoder `{generator.get('spec')}` zero-shot (no weight update), "
                f"the passages numbered in its ChatML prompt, {generator.get('strategy')} "
                f"answers of at most {generator.get('max_new_tokens')} tokens")
    if generator.get("prompt_format") == "chat":
        params = generator.get("parameters") or {}
        return (f"the chat decoder `{generator.get('init_from')}` fine-tuned RAFT style "
                f"({params.get('trainable', 0):,} of {params.get('total', 0):,} parameters "
                f"trained, {generator.get('step')} steps) on the same ChatML prompts it is "
                f"asked with")
    return "the shared transformer in prefix-LM mode trained RAFT style"


def _rag(runs):
    sections = [_rag_part(runs, part) for part in RAG_PARTS if _finished(runs, part)]
    return "\n\n".join(sections) or "## 4. Closed-book vs RAG\n\nNot run."


def _speed(mode_results):
    """Questions/s of a mode's decoded questions; answers read from an earlier mode's
    identical prompts (exact search retrieving what the index did) are not timed."""
    speed, reused = mode_results.get("questions_per_s"), mode_results.get("answers_reused", 0)
    if speed is None:
        return f"— (all {reused} answers as the index's prompts)"
    return f"{speed:.1f}" + (f" ({reused} answers as the index's prompts)" if reused else "")


def _rag_part(runs, part):
    results = _finished(runs, part)[0][1]
    modes = (("closed_book", "closed-book (question only)"),
             ("rag_exact", "RAG, exact search"), ("rag_index", "RAG, ScaNN index"),
             ("oracle", "oracle (the answer's passage)"))
    rows = [(label, _pct([_value(results, f"{key}/exact_match")]),
             _pct([_value(results, f"{key}/f1")]),
             _pct([_value(results, f"{key}/gold_contained")]),
             _speed(results[key]))
            for key, label in modes if key in results]
    shots = results.get("in_context", {})
    for key, label in (("closed_book", "closed-book"), ("retrieval", "RAG, exact search")):
        if key in shots:  # The same questions with k demonstrations in the prompt.
            row = shots[key]
            rows.append((f"{label}, {shots['k']}-shot", *(
                _pct([_value(row, f"{m}/mean")]) for m in
                ("exact_match", "f1", "gold_contained")),
                f"{row['count'] / max(row['seconds'], 1e-9):.1f}"))
    retrieval = results.get("retrieval", {})
    recall = [(k, f"{100 * v:.1f}%") for k, v in retrieval.items()
              if "recall" in k]
    new = results.get("new_information", {})
    kb = results.get("knowledge_base", {})
    test_questions = kb.get("questions", {}).get("test")
    lines = [
        f"## 4{'b' if part == 'rag_tuned' else ''}. Closed-book vs retrieval-augmented "
        f"generation{' (fine-tuned generator)' if part == 'rag_tuned' else ''}",
        "",
        f"{test_questions} held-out WordNet knowledge questions (retrieval/wordnet_qa.py) "
        f"over a {kb.get('passages')}-passage knowledge base, about synsets no training "
        f"example used. The retriever is all-MiniLM-L6-v2, k={retrieval.get('k')} passages "
        f"per question; the generator is {_generator_text(results.get('generator', {}))}. "
        f"Gold contained: the gold answer appears, as whole words, in the answer.",
        "",
        _table(["mode", "exact match", "token F1", "gold contained", "questions/s"], rows),
        "",
        _table(["retrieval", "value"], recall),
    ]
    paired = _question_tests(results)
    if paired:
        lines += ["", "Paired over the same questions (the second setting minus the first, in "
                  "points): exact match and gold contained with the exact McNemar test, "
                  "token F1 with a percentile bootstrap interval over questions (significant "
                  "when it excludes 0); *not significant* claims no difference. Greedy "
                  "decoding is deterministic, so the questions, not seeds, are the sample.",
                  "", _table(["comparison", "exact match", "token F1", "gold contained"],
                             paired)]
    if new:
        lines += [
            "",
            f"**New facts without retraining**: {new.get('passages')} test passages were "
            f"left out of the index, then upserted ({new.get('upsert_s', 0):.1f} s). On "
            f"their {new.get('questions')} questions:",
            "",
            _table(["index", "exact match", "token F1", "gold contained",
                    "gold passage cited"], [
                (when, _pct([_value(new, f'{when}/exact_match')]),
                 _pct([_value(new, f'{when}/f1')]),
                 _pct([_value(new, f'{when}/gold_contained')]),
                 _pct([_value(new, f'{when}/gold_passage_cited')]))
                for when in ("before", "after")]),
        ]
    return "\n".join(lines)


_QUESTION_PAIRS = (  # (first, second, label): paths to per-question scores in results.json.
    ("closed_book", "rag_index", "closed-book → RAG (ScaNN)"),
    ("rag_index", "oracle", "RAG (ScaNN) → oracle passage"),
    ("new_information/before", "new_information/after", "new facts: before → after upsert"),
    ("closed_book", "in_context/closed_book", "closed-book: zero-shot → k-shot"),
    ("rag_exact", "in_context/retrieval", "RAG (exact): zero-shot → k-shot"),
)


def question_test(first, second, metric):
    """'+12.5, p = 0.003' / '+2.1, not significant (p = 0.48)': second - first in points
    over the same questions; McNemar for 0/1 metrics, a bootstrap interval for F1."""
    a, b = np.asarray(first, float), np.asarray(second, float)
    if a.size == 0 or a.shape != b.shape:
        return "–"
    diff = 100 * (b.mean() - a.mean())
    if metric == "f1":
        _, (low, high) = statistics.paired_difference(b, a)
        verdict = ("" if low > 0 or high < 0 else "not significant ")
        return f"{diff:+.1f} {verdict}[{100 * low:+.1f}, {100 * high:+.1f}]"
    p = statistics.mcnemar_exact(b, a)
    return f"{diff:+.1f}, " + (statistics.format_p(p) if p < statistics.ALPHA
                               else f"not significant ({statistics.format_p(p)})")


def _paired_scores(results, first, second, metric):
    """Both settings' per-question `metric` scores, or None when the run kept none."""
    a, b = (_value(results, f"{path}/per_question/{metric}") for path in (first, second))
    return (a, b) if a and b and len(a) == len(b) else None


def _question_tests(results):
    rows = []
    for first, second, label in _QUESTION_PAIRS:
        a, b = (_value(results, f"{path}/per_question") for path in (first, second))
        if a and b:
            k = _value(results, "in_context/k")
            rows.append((label.replace("k-shot", f"{k}-shot"), *(
                question_test(a[m], b[m], m) for m in ("exact_match", "f1", "gold_contained"))))
    return rows


# --- Post-training ------------------------------------------------------------------------

_POST_MODES = (("closed_book", "closed-book"), ("with_passages", "with passages"))


def _post_training_runs(runs):
    """[(algo, results)] of the finished post_train trials, GRPO first."""
    done = [(str(_value(r, "algo", "?")), r) for _, r, _ in _finished(runs, "post_train")]
    return sorted(done, key=lambda ar: ar[0] != "grpo")


def _before_after(results, mode, metric):
    """'12.0% → 15.5% (+3.5, p = 0.02)': the SFT start vs the post-trained end on the
    same held-out questions, McNemar-tested when the run kept per-question scores."""
    start, end = (_value(results, f"{when}/{mode}/{metric}") for when in ("start", "end"))
    pair = _paired_scores(results, f"start/{mode}", f"end/{mode}", metric)
    return (f"{_pct([start])} → {_pct([end])}"
            + (f" ({question_test(*pair, metric)})" if pair else ""))


def _post_training(runs):
    done = _post_training_runs(runs)
    if not done:
        return ""
    rows = []
    for algo, r in done:
        for mode, label in _POST_MODES:
            end = _value(r, f"end/{mode}") or {}
            rows.append((f"{algo.upper()}, {label}", _before_after(r, mode, "exact_match"),
                         _before_after(r, mode, "gold_contained"),
                         f"{_value(r, f'start/{mode}/reward', float('nan')):.3f} → "
                         f"{end.get('reward', float('nan')):.3f}",
                         f"{end.get('kl', float('nan')):.3f}",
                         f"{end.get('answer_tokens', float('nan')):.1f}"))
    first = done[0][1]
    count = _value(first, "end/closed_book/count")
    return "\n".join([
        "## 4c. Post-training the fine-tuned decoder: GRPO and DPO",
        "",
        f"From `rag_tuned`'s SFT decoder (its LoRA merged; a fresh adapter trained on top, "
        f"the SFT model with that adapter off is the reference): GRPO maximises a "
        f"verifiable reward on its own sampled answers, DPO learns from pairs of a gold "
        f"answer over a wrong sample. {count} held-out questions, greedy answers, before "
        f"(SFT) → after; paired over the same questions (exact McNemar). KL: to the SFT "
        f"model, per answer.",
        "",
        _table(["run", "exact match", "gold contained", "reward", "KL", "answer tokens"],
               rows),
        "",
        _table(["run", "steps", "train time", "trainable parameters", "training signal"], [
            (algo.upper(), r.get("step", "–"), f"{r.get('train_time_s', 0):.0f} s",
             f"{_value(r, 'parameters/trainable', 0):,}",
             f"{r['pairs']} preference pairs" if r.get("pairs") else "rewards of sampled "
             "answers") for algo, r in done]),
    ])


def _search(runs):
    done = _finished(runs, "search")
    if not done:
        return "## 5. Hyperparameter search\n\nNot run."
    scored = [(t, r) for t, r, _ in done if _value(r, "validation/accuracy") is not None]
    best = max(scored, key=lambda tr: _value(tr[1], "validation/accuracy"))
    rows = []
    for trial, results in scored:
        mark = "**" if trial is best[0] else ""
        rows.append((f"{mark}{trial['name']}{mark}",
                     f"{trial['overrides'].get('optim.lr', '–')}",
                     f"{trial['overrides'].get('train.num_steps', '–')}",
                     _pct([_value(results, "validation/accuracy")]),
                     _pct([_value(results, "test/accuracy")])))
    return "\n".join([
        "## 5. Hyperparameter search (LoRA: learning rate and steps)",
        "",
        "Random search (log-uniform learning rate, uniform steps), chosen on validation "
        "accuracy; the test column is for reading only.",
        "",
        _table(["trial", "lr", "steps", "validation acc", "test acc"], rows),
        "",
        f"Best on validation: `{best[0]['name']}` — validation "
        f"{_pct([_value(best[1], 'validation/accuracy')])}, **test "
        f"{_pct([_value(best[1], 'test/accuracy')])}**.",
    ])


_LR_SELECTED = "the learning rate selected on validation (section 6)"


def _lr_selected(runs, part):
    """Whether the part's trials trained at lr_search's choice (sweep.json records the
    `{best:lr_search:optim.lr}` value in each trial's overrides)."""
    return any("optim.lr" in t["overrides"] for t, _, _ in runs.get(part, []))


def _trial_lr(trial_dir):
    """The learning rate a run trained at (its config.json), or None."""
    path = os.path.join(trial_dir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["optim"]["lr"]


def _lr_search(runs):
    """Per method: the learning rates tried, their validation accuracy (mean over seeds)
    and the best one in bold, the rule train/experiments/ablations.py selects by."""
    done = [(trial["overrides"].get("arg.method"), trial, results, trial_dir)
            for trial, results, trial_dir in _finished(runs, "lr_search")]
    done += [("full, from scratch", trial, results, trial_dir)
             for trial, results, trial_dir in _finished(runs, "lr_search_scratch")]
    if not done:
        return ""
    tried = {}  # method -> {lr_scale: (lr, [validation accuracy over seeds])}
    for method, trial, results, trial_dir in done:
        accuracy = _value(results, "validation/accuracy")
        if accuracy is None:
            continue
        entry = tried.setdefault(method, {}).setdefault(
            trial["overrides"].get("arg.lr_scale"), (_trial_lr(trial_dir), []))
        entry[1].append(accuracy)
    rows, counts = [], [len(a) for by_scale in tried.values() for _, a in by_scale.values()]
    seeds = "one seed" if max(counts, default=1) == 1 else f"mean of {max(counts)} seeds"
    for method, by_scale in tried.items():
        scored = [(scale, f"{lr:.3g}" if lr is not None else f"lr_scale={scale}",
                   float(np.mean(accuracies)))
                  for scale, (lr, accuracies) in by_scale.items()]
        best = max(range(len(scored)), key=lambda i: scored[i][2])  # First on a tie.
        cells = [f"{'**' * (i == best)}{lr}: {100 * acc:.1f}%{'**' * (i == best)}"
                 for i, (_, lr, acc) in enumerate(scored)]
        scales = [float(scale) for scale, _, _ in scored]
        edge = (" (edge of the grid)" if len(scored) > 2 and float(scored[best][0]) in (
            min(scales), max(scales)) else "")
        rows.append((method, ", ".join(cells), scored[best][1] + edge))
    return "\n".join([
        "## 6. Learning rate per method, chosen on validation",
        "",
        f"Each method from the MLM checkpoint at 100% of the labels ({seeds}, the "
        "same steps and batch as sections 1–2) at multiples of its default learning rate "
        "(model/finetune_methods.py × `lr_scale`); the one with the best validation "
        "accuracy (bold) is the one section 2 and section 1's pre-trained runs train it "
        "at" + (" (\"full, from scratch\": the same grid from random init, section 1's "
                "scratch runs)" if _finished(runs, "lr_search_scratch") else "")
        + ". Test accuracy played no part. A choice at the edge of the grid may lie "
        "beyond it.",
        "",
        _table(["method", "learning rate: validation acc", "chosen"], rows),
    ])


def _summary(runs, record):
    """The seeds' comparison (purpose, data requirement, compute, flexibility), filled
    in with this run's figures."""
    rows = _label_rows(runs)
    low = rows[0] if rows else None
    high = rows[-1] if rows else None
    pretrain = _finished(runs, "pretrain")
    methods = _method_rows(runs)
    rag = _finished(runs, "rag")

    def acc(results):  # Over seeds: [results] or {seed: results}.
        results = results.values() if isinstance(results, dict) else results
        return _pct([_value(r, "test/accuracy") for r in results])

    data_scratch = (f"{acc(high[2])} test acc with {100 * high[0]:g}% of labels; "
                    f"{acc(low[2])} with {100 * low[0]:g}%") if rows else "not run"
    data_tuned = (f"{acc(high[3])} with {100 * high[0]:g}%; {acc(low[3])} with "
                  f"{100 * low[0]:g}% of labels") if rows else "not run"
    pre_cost = (f"{pretrain[0][1].get('train_time_s', 0):.0f} s once, no labels"
                if pretrain else "not run")
    smallest = None
    if methods:
        efficient = [(label, r) for label, r in methods if "MiniLM" not in label]
        if efficient:
            label, results = min(efficient, key=lambda lr: _value(
                lr[1][0], "parameters/trainable") or float("inf"))
            share = (_value(results[0], "parameters/trainable") or 0) / max(
                _value(results[0], "parameters/total") or 1, 1)
            smallest = f"{label}: {100 * share:.2f}% of parameters trained, {acc(results)}"
    rag_text, rag_flex = "not run", "not run"
    if rag:
        r = rag[0][1]
        rag_text = (f"gold answer contained: closed-book "
                    f"{_pct([_value(r, 'closed_book/gold_contained')])} → RAG "
                    f"{_pct([_value(r, 'rag_index/gold_contained')])}"
                    f"{_tested(r, 'closed_book', 'rag_index', 'gold_contained')} (oracle "
                    f"{_pct([_value(r, 'oracle/gold_contained')])}); token F1 "
                    f"{_pct([_value(r, 'closed_book/f1')])} → "
                    f"{_pct([_value(r, 'rag_index/f1')])}"
                    f"{_f1_tested(r, 'closed_book', 'rag_index')}")
        rag_flex = (f"new facts: gold contained "
                    f"{_pct([_value(r, 'new_information/before/gold_contained')])} → "
                    f"{_pct([_value(r, 'new_information/after/gold_contained')])}"
                    f"{_tested(r, *_NEW_FACTS, 'gold_contained')}; token F1 "
                    f"{_pct([_value(r, 'new_information/before/f1')])} → "
                    f"{_pct([_value(r, 'new_information/after/f1')])}"
                    f"{_f1_tested(r, *_NEW_FACTS)} after an index upsert, no retraining")
    icl_data, icl_compute, icl_flex = "not run", "not run", "not run"
    shots = rag[0][1].get("in_context") if rag else None
    if shots:
        r, k = rag[0][1], shots["k"]
        icl_data = f"{k} labelled question/answer demonstrations in each prompt"
        tokens = [f"{shots[s]['prompt_tokens']:.0f} {label}" for s, label in (
            ("closed_book", "prompt tokens closed-book"), ("retrieval", "with passages"))
            if s in shots]
        icl_compute = f"no training; {', '.join(tokens)}; {_time_per_question(shots)}"
        icl_flex = "; ".join([
            *(f"exact match {label} {_pct([_value(r, f'{zero}/exact_match')])} zero-shot → "
              f"{_pct([_value(shots, f'{s}/exact_match/mean')])} {k}-shot"
              f"{_tested(r, zero, f'in_context/{s}', 'exact_match')}"
              for s, zero, label in (("closed_book", "closed_book", "closed-book"),
                                     ("retrieval", "rag_exact", "with passages"))
              if s in shots),
            "a new task = new demonstrations"])
    post = _post_training_runs(runs)
    post_data = "; ".join(
        f"DPO: {r['pairs']} preference pairs" if r.get("pairs") else
        f"{algo.upper()}: questions and a reward function, no target text"
        for algo, r in post) or "not run (scale=full)"
    post_compute = "; ".join(f"{algo.upper()} {r.get('train_time_s', 0):.0f} s after SFT"
                             for algo, r in post) or "not run"
    post_flex = "; ".join([*(f"{algo.upper()}: closed-book exact match "
                             f"{_before_after(r, 'closed_book', 'exact_match')}"
                             for algo, r in post),
                           "a new objective = a new reward function"]) if post else "not run"
    return "\n".join([
        "## Summary: the stages side by side",
        "",
        _table(["stage", "purpose", "data requirement (measured)", "compute (measured)",
                "flexibility (measured)"], [
            ("training from scratch", "a task model from random weights",
             data_scratch, _time(runs, "scratch"), "one task; anything new = retrain"),
            ("MLM pre-training", "a general encoder from unlabeled text",
             "unlabeled glosses only", pre_cost, "reused by every fine-tuning run"),
            ("fine-tuning (full / PEFT)", "adapt the pre-trained encoder to a task",
             data_tuned, _time(runs, "finetune"),
             smallest or "not run"),
            ("retrieval-augmented generation", "answer from an updatable knowledge base",
             "question/answer pairs; the KB is unlabeled text", rag_text, rag_flex),
            ("in-context learning", "steer a pre-trained decoder with examples in its "
             "prompt, no weight update", icl_data, icl_compute, icl_flex),
            ("post-training (GRPO / DPO)", "improve a fine-tuned decoder from rewards or "
             "preferences instead of target text", post_data, post_compute, post_flex),
        ]),
    ])


_NEW_FACTS = ("new_information/before", "new_information/after")


def _tested(results, first, second, metric):
    """' (McNemar p = 0.003)' / ' (not significant, p = 0.48)' for a summary cell; '' when
    the run kept no per-question scores."""
    pair = _paired_scores(results, first, second, metric)
    if pair is None:
        return ""
    p = statistics.mcnemar_exact(pair[1], pair[0])
    return (f" (McNemar {statistics.format_p(p)})" if p < statistics.ALPHA
            else f" (not significant, {statistics.format_p(p)})")


def _f1_tested(results, first, second):
    """' (+4.1 [+1.5, +6.8])' for a summary cell: the token-F1 difference over the same
    questions with its bootstrap interval ('not significant' when it holds 0)."""
    pair = _paired_scores(results, first, second, "f1")
    return "" if pair is None else f" ({question_test(*pair, 'f1')})"


def _time_per_question(shots):
    asked = [s for s in ("closed_book", "retrieval") if s in shots]
    seconds = sum(shots[s]["seconds"] for s in asked)
    count = sum(shots[s]["count"] for s in asked)
    return f"{seconds / max(count, 1):.2f} s per question"


def _time(runs, part):
    done = _finished(runs, part)
    if not done:
        return "not run"
    return f"{np.mean([r.get('train_time_s', 0) for _, r, _ in done]):.0f} s per run"
