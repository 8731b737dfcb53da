"""Ablations: parts declared, checked, run in order and resumed; the stages report's
figures are the runs' own."""

import collections
import dataclasses
import json
import os
import re
import time
import zlib

import numpy as np
import pytest
from scipy import stats

from launch import sweep as launch_sweep
from train.experiments import ablations, sweeps

STAGES = "configs/ablations/stages.py"


def load_stages(workdir, arg=""):
    return launch_sweep.load_ablation(f"{STAGES}:{arg}" if arg else STAGES, str(workdir))


@pytest.mark.parametrize("scale", ["demo", "cpu", "full"])
def test_stages_parts_build_valid_configs_in_dependency_order(scale, tmp_path):
    from train.config_checks import validate

    parts, report = load_stages(tmp_path, f"scale={scale}")
    assert report == "stages"
    names = [p.name for p in parts]
    assert names == ["pretrain", *(["lr_search", "lr_search_scratch"] if scale != "demo"
                                   else []), "scratch",
                     "finetune", "methods", *(["minilm"] if scale != "demo" else []), "rag",
                     *(["rag_tuned", "post_train"] if scale == "full" else []),
                     *(["search"] if scale != "demo" else [])]
    pretrain_trial = sweeps.enumerate_trials(parts[0].spec)[0]
    pretrained = os.path.join(str(tmp_path), "pretrain", pretrain_trial.name)
    configs = {}
    for part in parts:
        for trial in sweeps.enumerate_trials(part.spec):
            config = sweeps.trial_config(part.config, trial, part.overrides)
            validate(config)
            configs[(part.name, trial.name)] = config
    supervised = {k: c for k, c in configs.items() if k[0] in (
        "lr_search", "lr_search_scratch", "scratch", "finetune", "methods", "search")}
    # Fine-tuned runs start from the pre-training part's run; scratch from nothing.
    for (part, _), config in supervised.items():
        assert config.init_from == ("" if "scratch" in part else pretrained), part
        # Same model as the pre-trained one (its checkpoint must load).
        assert config.model.hidden == configs[("pretrain", pretrain_trial.name)].model.hidden
    # RAG: SmolLM2 zero-shot; at full scale also fine-tuned RAFT style on its ChatML prompts.
    (rag,) = [c for k, c in configs.items() if k[0] == "rag"]
    assert rag.rag.generator == "gguf:smollm2" and rag.rag.question_kinds == ("hypernym",
                                                                             "gloss")
    for (part, _), config in configs.items():
        if part == "rag_tuned":
            assert (config.rag.generator, config.init_from) == ("", "gguf:smollm2")
            assert config.data.prompt_format == "chat" and config.model.lora_rank > 0
            assert config.rag.max_eval_questions == rag.rag.max_eval_questions
    # Post-training (full scale): GRPO and DPO from rag_tuned's run, on its held-out
    # questions (its `{workdir}` in the config argument, resolved).
    post = {c.task: c for k, c in configs.items() if k[0] == "post_train"}
    assert sorted(post) == (["dpo", "grpo"] if scale == "full" else [])
    for config in post.values():
        assert config.init_from == f"{tmp_path}/rag_tuned/seed=0"  # Its generator/ once run.
        assert config.data.qa_dir == f"{tmp_path}/rag_tuned/seed=0/qa"
        assert config.post_train.eval_questions == rag.rag.max_eval_questions
    # Equal budgets: every supervised run of the comparison has the same steps and batch.
    compared = [c for k, c in supervised.items() if k[0] != "search"]
    assert len({(c.train.num_steps, c.data.batch_size, c.data.seq_len) for c in compared}) == 1
    fractions = sorted(c.data.label_fraction for k, c in configs.items() if k[0] == "scratch")
    assert fractions == sorted(c.data.label_fraction for k, c in configs.items()
                               if k[0] == "finetune")
    assert sorted(set(fractions)) == ([0.01, 1.0] if scale == "demo" else [0.01, 0.1, 1.0])
    methods = {c.optim.param_rules for k, c in configs.items() if k[0] == "methods"}
    assert len(methods) >= 8  # Distinct parameter masks (lld and full share none: lld).
    search_steps = {c.train.num_steps for k, c in configs.items() if k[0] == "search"}
    assert len(search_steps) == len([k for k in configs if k[0] == "search"])  # Drawn.
    # Three seeds per compared run; seed_base shifts all of them, pre-training's too.
    # The data-requirement parts over more seeds than the methods (at 1% of the labels a
    # run from scratch varies most).
    label_seeds = 3 if scale == "full" else 5
    assert sorted(c.seed for k, c in configs.items() if k[0] == "scratch") == sorted(
        list(range(label_seeds)) * len(set(fractions)))
    assert sorted(c.seed for k, c in configs.items() if k[0] == "methods") == sorted(
        [0, 1, 2] * len({c.optim.param_rules for k, c in configs.items() if k[0] == "methods"}))
    shifted, _ = load_stages(tmp_path, f"scale={scale},seed_base=10")
    seeds = {p.name: p.spec.seeds for p in shifted}
    assert seeds["pretrain"] == (10,) and seeds["methods"] == (10, 11, 12)
    assert seeds["finetune"] == tuple(range(10, 10 + label_seeds))
    finetune = next(p for p in shifted if p.name == "finetune")
    assert f"init_from={tmp_path}/pretrain/seed=10" in finetune.overrides


def test_part_errors_name_the_part(tmp_path):
    good = dict(name="a", config=STAGES.replace("ablations/stages", "scratch"),
                sweep=dict(seeds=[0]))
    with pytest.raises(ValueError, match="name must be a unique"):
        ablations.parse_ablation(dict(parts=[good, good]), tmp_path)
    with pytest.raises(ValueError, match=r"part 0 \('a'\): unknown field\(s\) \['sweeep'\]"):
        ablations.parse_ablation(dict(parts=[{**good, "sweeep": 1}]), tmp_path)
    with pytest.raises(ValueError, match=r"\['optim.lr'\] are also swept"):
        ablations.parse_ablation(dict(parts=[{
            **good, "sweep": dict(grid={"optim.lr": [1e-3, 1e-2]}),
            "overrides": {"optim.lr": 1e-4}}]), tmp_path)
    with pytest.raises(ValueError, match=r"names part 'b', which is not declared before"):
        ablations.parse_ablation(dict(parts=[{
            **good, "overrides": {"optim.lr": "{best:b:optim.lr}"}}]), tmp_path)
    with pytest.raises(ValueError, match="no parts"):
        ablations.parse_ablation(dict(parts=[]), tmp_path)
    parts, _ = ablations.parse_ablation(dict(parts=[{
        **good, "overrides": {"init_from": "{workdir}/a/seed=0", "optim.lr": 0.5}}]),
        tmp_path / "w")
    assert parts[0].overrides == (f"init_from={tmp_path / 'w'}/a/seed=0", "optim.lr=0.5")


def seed_effect(config):
    """0 at seed 0; else what the seed does to every run (pairing removes it) plus a
    per-run jitter below 2 points (what a paired test weighs the difference against)."""
    if not config.seed:
        return 0.0
    run = f"{config.seed}:{config.get('init_from')}:{config.data.label_fraction}:" \
          f"{config.optim.param_rules}"
    return 0.03 * config.seed + 0.02 * (zlib.crc32(run.encode()) % 1000) / 1000


def per_question(exact, f1, contained, n=100):
    """Per-question scores with these counts of exact matches and gold-contained answers
    (the first questions) and a constant F1."""
    flags = lambda k: [1.0] * k + [0.0] * (n - k)  # noqa: E731
    return {"exact_match": flags(exact), "f1": [f1] * n, "gold_contained": flags(contained)}


class FakeTrainer:
    """Writes a results.json whose numbers follow from the trial's config, so the
    report's figures can be checked against them; records what it ran."""

    def __init__(self, fail=()):
        self.ran, self.fail = [], set(fail)
        self.post_training_starts = {}  # algo -> (init_from, data.seq_len) it was given.

    def __call__(self, trial, config, workdir):
        part = os.path.basename(os.path.dirname(workdir))
        self.ran.append(f"{part}/{trial.name}")
        if part in self.fail:
            raise RuntimeError("boom")
        os.makedirs(workdir, exist_ok=True)
        if config.task == "rag" and not config.rag.generator:  # Trains one (rag_tuned).
            os.makedirs(os.path.join(workdir, "generator"), exist_ok=True)
            with open(os.path.join(workdir, "generator", "config.json"), "w") as f:
                json.dump({"data": {"seq_len": 320, "tokenizer_path": "gguf:smollm2"}}, f)
        if config.task in ("grpo", "dpo"):
            self.post_training_starts[config.task] = (config.init_from, config.data.seq_len)
        if config.task == "rag":
            results = {"closed_book": {"exact_match": 0.01, "f1": 0.05,
                                       "gold_contained": 0.1,
                                       "per_question": per_question(1, 0.05, 10)},
                       "rag_index": {"exact_match": 0.2, "f1": 0.4, "gold_contained": 0.5,
                                     "per_question": per_question(20, 0.4, 50)},
                       "rag_exact": {"exact_match": 0.2, "f1": 0.41},
                       "oracle": {"exact_match": 0.3, "f1": 0.5, "gold_contained": 0.6},
                       "generator": {"spec": config.rag.generator, "zero_shot": True,
                                     "strategy": "greedy", "max_new_tokens": 24},
                       "retrieval": {"k": 2, "index/recall@1": 0.9},
                       "knowledge_base": {"passages": 1000},
                       "new_information": {
                           "passages": 4, "questions": 4,
                           "before": {"f1": 0.1, "gold_contained": 0.0,
                                      "per_question": per_question(0, 0.1, 0, 4)},
                           "after": {"f1": 0.3, "gold_contained": 0.75,
                                     "per_question": per_question(0, 0.3, 3, 4)}}}
            shots = config.rag.in_context_k
            if shots:  # The config's k, and figures the report must carry over.
                results["in_context"] = {"k": shots, **{setting: {
                    "count": 48, "seconds": 24.0 * (1 + (setting == "retrieval")),
                    "prompt_tokens": 100.0 + 150 * (setting == "retrieval"),
                    **{m: {"mean": v, "interval": [0, 1]} for m, v in zip(
                        ("exact_match", "f1", "gold_contained"), values)}}
                    for setting, values in (("closed_book", (0.125, 0.2, 0.25)),
                                            ("retrieval", (0.375, 0.5, 0.625)))
                    if setting in config.rag.in_context_settings}}
        elif config.task in ("grpo", "dpo"):  # Post-training: 40 held-out questions.
            gains = 12 if config.task == "grpo" else 2  # Exact matches it adds (of 40).

            def evaluation(exact, contained):
                return {"exact_match": exact / 40, "gold_contained": contained / 40,
                        "reward": exact / 40, "kl": 0.0 if exact == 8 else 0.25,
                        "answer_tokens": 3.0, "count": 40,
                        "per_question": per_question(exact, 0.0, contained, 40)}
            modes = ("closed_book", "with_passages")
            results = {"algo": config.task, "step": config.train.num_steps,
                       "train_time_s": 30.0, "parameters": {"trainable": 4096},
                       "pairs": 64 if config.task == "dpo" else None,
                       "start": {m: evaluation(8, 10) for m in modes},
                       "end": {m: evaluation(8 + gains, 10 + gains) for m in modes}}
        else:
            pretrained = 0.1 if config.get("init_from") else 0.0
            accuracy = (0.3 + 0.2 * config.data.label_fraction + pretrained
                        + seed_effect(config))
            if config.task == "mlm":
                accuracy = 0.15
            trainable = 1000 if config.optim.param_rules else 100_000
            results = {"step": config.train.num_steps, "train_time_s": 10.0,
                       "validation": {"accuracy": accuracy + config.optim.lr, "loss": 1.0},
                       "test": {"accuracy": accuracy, "macro_f1": accuracy / 2},
                       "parameters": {"total": 100_000, "trainable": trainable},
                       "data": {"label_fraction": config.data.label_fraction,
                                "train_examples": int(1000 * config.data.label_fraction)},
                       "peak_memory": {"compiled_step_bytes": 2 ** 20}}
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json())


def test_stages_run_in_order_resume_and_report_their_figures(tmp_path):
    """The demo's parts with one seed each (the three-seed tables are the next test's)."""
    workdir = str(tmp_path / "stages")
    parts, report_name = load_stages(workdir)
    parts = [dataclasses.replace(p, spec=dataclasses.replace(p.spec, seeds=(0,)))
             for p in parts]
    trainer = FakeTrainer(fail={"rag"})
    failed = launch_sweep.run_ablation(STAGES, workdir, run_trial=trainer,
                                       ablation=(parts, report_name))
    assert failed == ["rag/seed=0"]
    expected = [f"{p.name}/{t.name}" for p in parts for t in sweeps.enumerate_trials(p.spec)]
    assert trainer.ran == expected  # Declaration order, every trial once.

    report = open(os.path.join(workdir, "report.md")).read()
    # Data requirement: 1% of labels -> 0.302 scratch, 0.402 pre-trained: +10.0 points,
    # which one seed cannot test.
    # Epochs: 400 steps x batch 32 / 10 examples = 1280 (config.json the trainer wrote).
    assert re.search(r"\| 1% \| 10 \| 1280 \| 30\.2% \| 0\.151 \| 40\.2% \| 0\.201 \| "
                     r"\+10\.0, not significant \(1 seed: untested\) \|", report), report
    assert "| 100% | 1000 | 13 | 50.0% |" in report
    assert "Closed-book vs RAG\n\nNot run." in report  # The failed part, not a crash.
    assert "1,000 (1.00%)" in report  # Trainable share of a PEFT method.
    # No learning-rate search in the demo: defaults, and no section for it.
    assert "each method at its default learning rate" in report
    assert "only the initialisation differs" in report and "## 6." not in report
    for png in ("data_requirement.png", "methods.png"):
        assert os.path.getsize(os.path.join(workdir, png)) > 1000
    record = json.load(open(os.path.join(workdir, "ablation.json")))
    assert record["parts"]["rag"]["failed"] == ["seed=0"]

    # Resumed: only the failed trial runs again; the report now has RAG's figures.
    again = FakeTrainer()
    assert launch_sweep.run_ablation(STAGES, workdir, run_trial=again,
                                     ablation=(parts, report_name)) == []
    assert again.ran == ["rag/seed=0"]
    report = open(os.path.join(workdir, "report.md")).read()
    assert "| RAG, ScaNN index | 20.0% | 40.0% | 50.0% |" in report
    # Paired over questions: the exact McNemar test is the binomial test of the discordant
    # pairs (scipy's here); F1 is constant per question, so its interval is the point.
    mcnemar = lambda only_one, discordant: stats.binomtest(  # noqa: E731
        only_one, discordant, 0.5).pvalue
    assert mcnemar(0, 40) < 0.001 and mcnemar(0, 19) < 0.001
    assert ("closed-book 10.0% → RAG 50.0% (McNemar p < 0.001) (oracle 60.0%); token F1 "
            "5.0% → 40.0% (+35.0 [+35.0, +35.0])") in report
    assert ("| closed-book → RAG (ScaNN) | +19.0, p < 0.001 | +35.0 [+35.0, +35.0] | "
            "+40.0, p < 0.001 |") in report
    # New facts: 3 of 4 answers gain the gold answer, none lose it: p = 0.25.
    assert f"{mcnemar(3, 3):.3g}" == "0.25"
    assert "| new facts: before → after upsert | +0.0, not significant (p = 1) | +20.0 " \
           "[+20.0, +20.0] | +75.0, not significant (p = 0.25) |" in report
    assert ("gold contained 0.0% → 75.0% (not significant, p = 0.25); token F1 10.0% → "
            "30.0% (+20.0 [+20.0, +20.0]) after an index upsert") in report
    assert "token F1 5.0% → 40.0% (+35.0 [+35.0, +35.0])" in report
    assert "`gguf:smollm2` zero-shot" in report
    # In-context learning: the same questions with the config's 3 demonstrations.
    assert "| closed-book, 3-shot | 12.5% | 20.0% | 25.0% | 2.0 |" in report
    assert "3-shot |" not in report.split("| closed-book, 3-shot |")[1]  # Demo: no RAG k-shot.
    (icl,) = [line for line in report.splitlines() if line.startswith("| in-context")]
    assert "3 labelled question/answer demonstrations" in icl
    assert "no training; 100 prompt tokens closed-book; 0.50 s per question" in icl
    # (This fake keeps no per-question k-shot scores: no test is stated.)
    assert "exact match closed-book 1.0% zero-shot → 12.5% 3-shot; a new task" in icl
    assert "Hyperparameter search\n\nNot run." in report  # Not a demo part.


def test_stages_report_over_three_seeds_gives_intervals_and_paired_tests(tmp_path,
                                                                          monkeypatch):
    """scale=full's three seeds through the data-requirement and methods parts (two of
    the methods): each cell is mean ± sd [95% t-interval], each gain or difference from
    full fine-tuning carries its paired t-test; both as scipy computes them here from the
    runs' results.json."""
    # The parts' own sweep tables and plots after every trial: not what this checks.
    monkeypatch.setattr(launch_sweep.sweep_report, "write_report",
                        lambda *a, **k: collections.defaultdict(str))
    workdir = str(tmp_path / "stages")
    # Each method at its default rate (the learning-rate search is the tests' below).
    parts, report = load_stages(workdir, "scale=full,lr_search=false")
    two_methods = {"arg.method": ["bitfit", "lora"]}
    parts = [dataclasses.replace(p, spec=dataclasses.replace(p.spec, grid=two_methods))
             if p.name == "methods" else p
             for p in parts if p.name in ("scratch", "finetune", "methods", "search")]
    assert launch_sweep.run_ablation(STAGES, workdir, run_trial=FakeTrainer(),
                                     ablation=(parts, report)) == []
    text = open(os.path.join(workdir, "report.md")).read()

    def accuracy(part, key):
        """{override value: {seed: test accuracy}} of one part."""
        (spec,) = [p.spec for p in parts if p.name == part]
        by_value = {}
        for trial in sweeps.enumerate_trials(spec):
            path = os.path.join(workdir, part, trial.name, "results.json")
            by_value.setdefault(trial.overrides[key], {})[trial.seed] = json.load(
                open(path))["test"]["accuracy"]
        return by_value

    def cell(by_seed):
        values = list(by_seed.values())
        mean, sd = np.mean(values), np.std(values, ddof=1)
        low, high = stats.t.interval(0.95, len(values) - 1, loc=mean,
                                     scale=stats.sem(values))
        return f"{100 * mean:.1f}% ± {100 * sd:.1f} [{100 * low:.1f}, {100 * high:.1f}]"

    def compared(a, b):
        seeds = sorted(a)
        assert seeds == sorted(b) == [0, 1, 2]
        differences = [b[s] - a[s] for s in seeds]
        mean = np.mean(differences)
        low, high = stats.t.interval(0.95, 2, loc=mean, scale=stats.sem(differences))
        p = stats.ttest_rel([b[s] for s in seeds], [a[s] for s in seeds]).pvalue
        p_text = "p < 0.001" if p < 0.001 else f"p = {p:.3g}"
        return (f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}], "
                + (p_text if p < 0.05 else f"not significant ({p_text})"))

    def row(first_cell):
        main_tables = text.split("### 2b.")[0]  # (2b's rows start with method names too.)
        (line,) = [line for line in main_tables.splitlines()
                   if line.startswith(f"| {first_cell} |")]
        return line

    scratch = accuracy("scratch", "data.label_fraction")
    tuned = accuracy("finetune", "data.label_fraction")
    for fraction in (0.01, 0.1, 1.0):
        line = row(f"{100 * fraction:g}%")
        for expected in (cell(scratch[fraction]), cell(tuned[fraction]),
                         compared(scratch[fraction], tuned[fraction])):
            assert f"| {expected} |" in line, (expected, line)
    methods = accuracy("methods", "arg.method")
    for method, by_seed in methods.items():
        assert row(method).startswith(f"| {method} | {cell(by_seed)} | ")
        assert f"| {compared(tuned[1.0], by_seed)} |" in row(method)
    assert row("full").startswith(f"| full | {cell(tuned[1.0])} | ")
    # Section 2b: every pair (full, bitfit, lora), row minus column, paired t over seeds,
    # Holm-adjusted over the 3 pairs (scipy's p-values, adjusted here by hand).
    by_method = {"full": tuned[1.0], **methods}
    order = sorted(by_method, key=lambda m: -np.mean(list(by_method[m].values())))
    pairs = [(order[i], order[j]) for i in range(3) for j in range(i + 1, 3)]
    raw = [stats.ttest_rel([by_method[a][s] for s in range(3)],
                           [by_method[b][s] for s in range(3)]).pvalue for a, b in pairs]
    ranked = np.argsort(raw)
    holm = np.maximum.accumulate([min(1.0, (3 - k) * raw[i]) for k, i in enumerate(ranked)])
    adjusted = dict(zip(ranked, holm))
    section = text.split("### 2b. The methods against each other")[1].split("\n## ")[0]
    assert f"| method | {order[1]} | {order[2]} |" in section
    for k, (a, b) in enumerate(pairs):
        difference = 100 * np.mean([by_method[a][s] - by_method[b][s] for s in range(3)])
        p = adjusted[k]
        mark = "**" if p < 0.05 else ""
        p_text = "p < 0.001" if p < 0.001 else f"p = {p:.3g}"
        assert f"{mark}{difference:+.1f}{mark} ({p_text})" in section, (a, b, section)
    # This fake's pre-training gains are significant, its methods' differences not.
    assert text.count(", p = ") + text.count(", p < 0.001") == 3
    assert text.count(", not significant (p = ") == 2
    assert "3 seeds: a cell is mean ± sd [95% Student-t interval" in text
    # The search's best trial (highest validation accuracy = highest lr here) is bold.
    search = [t for p in parts if p.name == "search" for t in sweeps.enumerate_trials(p.spec)]
    best = max(search, key=lambda t: t.overrides["optim.lr"])
    assert f"| **{best.name}** |" in text and f"`{best.name}`" in text


def test_post_training_section_and_summary_row_test_each_run_against_its_sft_start(
        tmp_path):
    """scale=full's rag_tuned then post_train (GRPO, DPO): each held-out metric before
    (SFT) → after, McNemar-tested as scipy computes it; the summary's post-training row
    filled from the runs; without the part (the demo), the row says "not run"."""
    workdir = str(tmp_path / "stages")
    parts, report = load_stages(workdir, "scale=full,lr_search=false")
    parts = [p for p in parts if p.name in ("rag_tuned", "post_train")]
    trainer = FakeTrainer()
    assert launch_sweep.run_ablation(STAGES, workdir, run_trial=trainer,
                                     ablation=(parts, report)) == []
    assert trainer.ran == ["rag_tuned/seed=0", "post_train/algo=grpo,seed=0",
                           "post_train/algo=dpo,seed=0"]
    # Configs resolved when the part starts: rag_tuned's generator, at its shapes.
    generator = os.path.join(workdir, "rag_tuned", "seed=0", "generator")
    assert trainer.post_training_starts == {"grpo": (generator, 320), "dpo": (generator, 320)}
    text = open(os.path.join(workdir, "report.md")).read()
    # GRPO: 12 questions gained, none lost (of 40): exact McNemar = binomial(0 of 12).
    p_grpo = stats.binomtest(0, 12, 0.5).pvalue
    assert p_grpo < 0.001
    assert ("| GRPO, closed-book | 20.0% → 50.0% (+30.0, p < 0.001) | 25.0% → 55.0% "
            "(+30.0, p < 0.001) | 0.200 → 0.500 | 0.250 | 3.0 |") in text, text
    # DPO: 2 gained: p = 0.5, not significant.
    assert f"{stats.binomtest(0, 2, 0.5).pvalue:.3g}" == "0.5"
    assert ("| DPO, with passages | 20.0% → 25.0% (+5.0, not significant (p = 0.5)) |"
            in text)
    assert "| GRPO | 500 | 30 s | 4,096 | rewards of sampled answers |" in text
    assert "| DPO | 500 | 30 s | 4,096 | 64 preference pairs |" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| post-training")]
    assert ("GRPO: questions and a reward function, no target text; DPO: 64 preference "
            "pairs | GRPO 30 s after SFT; DPO 30 s after SFT | GRPO: closed-book exact "
            "match 20.0% → 50.0% (+30.0, p < 0.001); DPO: closed-book exact match 20.0% "
            "→ 25.0% (+5.0, not significant (p = 0.5))") in row, row

    demo = str(tmp_path / "demo")
    parts, report = load_stages(demo)
    assert launch_sweep.run_ablation(STAGES, demo, run_trial=FakeTrainer(), ablation=(
        [p for p in parts if p.name == "rag"], report)) == []
    text = open(os.path.join(demo, "report.md")).read()
    (row,) = [line for line in text.splitlines() if line.startswith("| post-training")]
    assert row.endswith("| not run (scale=full) | not run | not run |")
    assert "## 4c." not in text


class InterruptedTrainer(FakeTrainer):
    """Spends `seconds` on each trial; Ctrl-C at the `interrupt_at`-th trial it runs."""

    def __init__(self, seconds, interrupt_at=None):
        super().__init__()
        self.seconds, self.interrupt_at = seconds, interrupt_at

    def __call__(self, trial, config, workdir):
        time.sleep(self.seconds)
        if len(self.ran) + 1 == self.interrupt_at:
            raise KeyboardInterrupt
        return super().__call__(trial, config, workdir)


def test_a_part_s_wall_time_sums_its_invocations_interrupted_ones_included(tmp_path):
    workdir = str(tmp_path / "stages")
    parts, report = load_stages(workdir)
    part = dataclasses.replace(parts[1], spec=dataclasses.replace(parts[1].spec,
                                                                  seeds=(0, 1, 2)))
    first = InterruptedTrainer(0.3, interrupt_at=3)  # Two trials done, then Ctrl-C.
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        launch_sweep.run_ablation(STAGES, workdir, run_trial=first,
                                  ablation=([part], None))
    first_wall = time.perf_counter() - start
    recorded = ablations.read_record(workdir)["parts"][part.name]
    assert 3 * 0.3 <= recorded["wall_s"] <= first_wall and recorded["failed"] == []

    second = InterruptedTrainer(0.3)  # The rest: one trial per label fraction.
    start = time.perf_counter()
    assert launch_sweep.run_ablation(STAGES, workdir, run_trial=second,
                                     ablation=([part], None)) == []
    second_wall = time.perf_counter() - start
    total = ablations.read_record(workdir)["parts"][part.name]["wall_s"]
    assert len(second.ran) == len(sweeps.enumerate_trials(part.spec)) - 2
    assert recorded["wall_s"] + 0.3 * len(second.ran) <= total <= recorded["wall_s"] + \
        second_wall


class PeakedTrainer(FakeTrainer):
    """FakeTrainer whose lr_search runs peak on validation at a method-dependent
    multiple of the default learning rate, with test accuracy falling as validation
    rises (selecting on test would pick another rate); `fail_method`'s runs raise."""

    def __init__(self, fail_method=None):
        super().__init__()
        self.fail_method = fail_method

    def __call__(self, trial, config, workdir):
        part = os.path.basename(os.path.dirname(workdir))
        method = trial.overrides.get("arg.method", "scratch" if "scratch" in part else None)
        if part not in ("lr_search", "lr_search_scratch"):
            return super().__call__(trial, config, workdir)
        if method == self.fail_method:
            self.ran.append(f"{part}/{trial.name}")
            raise RuntimeError("diverged")
        super().__call__(trial, config, workdir)
        peak = (1 / 3, 1.0, 3.0)[zlib.crc32(method.encode()) % 3]
        distance = np.log(trial.overrides["arg.lr_scale"] / 15.0 / peak) ** 2
        path = os.path.join(workdir, "results.json")
        results = json.load(open(path))
        results["validation"]["accuracy"] = 0.5 - 0.1 * distance
        results["test"]["accuracy"] = 0.3 + 0.1 * distance
        json.dump(results, open(path, "w"))


def lr_search_parts(workdir, methods=("bitfit", "lora", "ia3")):
    """The demo with lr_search=true, one seed and a few methods: lr_search,
    lr_search_scratch, scratch, finetune and methods (their pre-training is a path only)."""
    parts, report = load_stages(workdir, "lr_search=true")
    grid = {"arg.method": list(methods)}
    short = []
    for part in parts:
        spec = dataclasses.replace(part.spec, seeds=(0,))
        if part.name == "lr_search":
            spec = dataclasses.replace(spec, grid={"arg.method": ["full", *methods],
                                                   "arg.lr_scale": spec.grid["arg.lr_scale"]})
        elif part.name == "methods":
            spec = dataclasses.replace(spec, grid=grid)
        elif part.name in ("scratch", "finetune"):
            spec = dataclasses.replace(spec, grid={"data.label_fraction": [1.0]})
        elif part.name != "lr_search_scratch":
            continue
        short.append(dataclasses.replace(part, spec=spec))
    return short, report


def test_lr_search_selects_each_methods_rate_on_validation_and_resumes(tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(launch_sweep.sweep_report, "write_report",
                        lambda *a, **k: collections.defaultdict(str))
    workdir = str(tmp_path / "stages")
    parts, report = lr_search_parts(workdir)
    assert [p.name for p in parts] == ["lr_search", "lr_search_scratch", "scratch",
                                       "finetune", "methods"]
    trainer = PeakedTrainer()
    assert launch_sweep.run_ablation(STAGES, workdir, run_trial=trainer,
                                     ablation=(parts, report)) == []
    # The search: every method x 3 rates, one seed, 100% of the labels, before the rest.
    search = sweeps.enumerate_trials(parts[0].spec)
    assert len(search) == 4 * 3 and trainer.ran[:12] == [f"lr_search/{t.name}" for t in search]

    def read(part, trial_name, name):
        return json.load(open(os.path.join(workdir, part, trial_name, name)))

    # The argmax on validation per method, from the files the search wrote.
    best, best_on_test = {}, {}
    scratch_search = sweeps.enumerate_trials(parts[1].spec)
    for part, trial in [*(("lr_search", t) for t in search),
                        *(("lr_search_scratch", t) for t in scratch_search)]:
        method = trial.overrides.get("arg.method", "scratch")
        config = read(part, trial.name, "config.json")
        results = read(part, trial.name, "results.json")
        assert config["data"]["label_fraction"] == 1.0 and config["seed"] == 0
        assert (config["init_from"] == "") == (method == "scratch")
        for chosen, split in ((best, "validation"), (best_on_test, "test")):
            score = results[split]["accuracy"]
            if method not in chosen or score > chosen[method][1]:
                chosen[method] = (config["optim"]["lr"], score)
    best = {m: lr for m, (lr, _) in best.items()}
    assert len(set(best.values())) > 1  # Not one rate for all: the fake's peaks differ.
    assert all(best[m] != best_on_test[m][0] for m in best)  # Test would choose otherwise.
    # Later parts train each method at its chosen rate (scratch at random init's);
    # sweep.json records it.
    for part in parts[2:]:
        for trial in sweeps.enumerate_trials(part.spec):
            method = trial.overrides.get("arg.method",
                                         "scratch" if part.name == "scratch" else "full")
            assert read(part.name, trial.name, "config.json")["optim"]["lr"] == best[method]
        recorded = read(part.name, "", "sweep.json")["trials"]
        assert {t["overrides"]["optim.lr"] for t in recorded} <= set(best.values())

    # The report: the rates tried with their validation accuracy, the chosen one in bold.
    from train.experiments import stages_report

    text = open(stages_report.write_report(workdir, parts)).read()
    assert "each method at the learning rate selected on validation (section 6)" in text
    assert "pre-trained runs at full fine-tuning's, the learning rate selected on " \
           "validation (section 6) at 100% of the labels; the scratch runs at the rate " \
           "selected the same way from random init" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| full, from scratch |")]
    assert f"**{best['scratch']:.3g}: " in row and row.count("**") == 2
    (row,) = [line for line in text.splitlines() if line.startswith("| lora |")
              and "**" in line]
    assert f"**{best['lora']:.3g}: " in row and row.count("**") == 2

    # Resumed: nothing runs again and the same rates resolve from the runs on disk.
    again = PeakedTrainer()
    assert launch_sweep.run_ablation(STAGES, workdir, run_trial=again,
                                     ablation=(parts, report)) == []
    assert again.ran == []
    for part in parts[2:]:
        for trial in ablations.resolve_trials(workdir, parts, part):
            assert trial.overrides["optim.lr"] == best[trial.overrides.get(
                "arg.method", "scratch" if part.name == "scratch" else "full")]
    # A search result changed under finished runs: refused, naming trial and values.
    loser = next(t for t in search if t.overrides["arg.method"] == "lora"
                 and read("lr_search", t.name, "config.json")["optim"]["lr"] != best["lora"])
    path = os.path.join(workdir, "lr_search", loser.name, "results.json")
    results = json.load(open(path))
    results["validation"]["accuracy"] = 0.99
    json.dump(results, open(path, "w"))
    with pytest.raises(ValueError, match=r"Part 'methods': trial method=lora,seed=0 "
                                         r"finished with optim.lr="):
        ablations.resolve_trials(workdir, parts, parts[4])


def test_lr_search_without_a_finished_trial_names_part_and_method(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_sweep.sweep_report, "write_report",
                        lambda *a, **k: collections.defaultdict(str))
    workdir = str(tmp_path / "stages")
    parts, report = lr_search_parts(workdir, methods=("lora",))
    trainer = PeakedTrainer(fail_method="lora")
    with pytest.raises(ValueError, match=r"Part 'methods' \(optim.lr\): part 'lr_search' "
                                         r"has no finished trial of method 'lora'"):
        launch_sweep.run_ablation(STAGES, workdir, run_trial=trainer,
                                  ablation=(parts, report))
    # full fine-tuning's search finished, so `scratch` and `finetune` ran; `methods` did
    # not start.
    counts = {p.name: len(sweeps.enumerate_trials(p.spec)) for p in parts}
    assert [r.split("/")[0] for r in trainer.ran] == \
        ["lr_search"] * 6 + ["lr_search_scratch"] * 3 + ["scratch"] * counts["scratch"] \
        + ["finetune"] * counts["finetune"]


def test_lr_search_print_mode_defers_the_parts_that_wait_for_it(tmp_path, capsys):
    parts, report = lr_search_parts(str(tmp_path / "stages"), methods=("lora",))
    launch_sweep.run_ablation(STAGES, str(tmp_path / "stages"), mode="print",
                              ablation=(parts, report))
    lines = capsys.readouterr().out.splitlines()
    assert sum("launch.main" in line and "/lr_search/" in line for line in lines) == 6
    assert not any("launch.main" in line and "/methods/" in line for line in lines)
    assert any(line.startswith("# Part methods: after the parts before it have finished")
               for line in lines)


def test_demo_parts_and_trials_unchanged_unless_lr_search_is_asked(tmp_path):
    def trials(parts):
        return {p.name: (p.config, p.overrides, p.selected,
                         [t.name for t in sweeps.enumerate_trials(p.spec)]) for p in parts}

    demo = trials(load_stages(tmp_path)[0])
    assert trials(load_stages(tmp_path, "lr_search=false")[0]) == demo
    assert not any(selected for _, _, selected, _ in demo.values())
    assert not any(o.startswith("optim.lr=") for part in ("finetune", "methods")
                   for o in demo[part][1])  # Each method at its default rate.
    # Asked: only the search parts are added, and scratch/finetune/methods select their rate.
    searched = trials(load_stages(tmp_path, "lr_search=true")[0])
    assert list(searched) == ["pretrain", "lr_search", "lr_search_scratch", *list(demo)[1:]]
    for name, (config, overrides, selected, names) in searched.items():
        if not name.startswith("lr_search"):
            source = {"scratch": "lr_search_scratch", "finetune": "lr_search",
                      "methods": "lr_search"}.get(name)
            expected = (("optim.lr", source, "optim.lr"),) if source else ()
            assert (config, overrides, selected, names) == (*demo[name][:2], expected,
                                                            demo[name][3])
    from model import finetune_methods

    (search,) = [p for p in load_stages(tmp_path, "lr_search=true")[0]
                 if p.name == "lr_search"]
    lrs = {}
    for trial in sweeps.enumerate_trials(search.spec):
        config = sweeps.trial_config(search.config, trial, search.overrides)
        lrs.setdefault(trial.overrides["arg.method"], []).append(config.optim.lr)
    assert list(lrs) == list(finetune_methods.METHODS)
    for method, values in lrs.items():  # Each method's default x 15 (demo) x 1/3, 1, 3.
        default = finetune_methods.get(method).lr * 15.0
        assert np.allclose(values, [default / 3, default, 3 * default], rtol=1e-9), method
    # scale=full searches a decade further each way (x 1/9 ... 9; its lr_scale is 3).
    for name in ("lr_search", "lr_search_scratch"):
        (wide,) = [p for p in load_stages(tmp_path, "scale=full")[0] if p.name == name]
        assert wide.spec.grid["arg.lr_scale"] == pytest.approx([3 / 9, 1, 3, 9, 27])


def test_parts_declare_how_many_trials_run_at_once_unless_the_command_says(tmp_path):
    parts, _ = load_stages(tmp_path)
    by_name = {p.name: p for p in parts}
    assert by_name["methods"].max_parallel == 2 and by_name["rag"].max_parallel == 1
    # No --mode: each part its own; a --mode on the command line: every part that one.
    assert ablations.part_mode(by_name["methods"], None, 4) == ("parallel", 2)
    assert ablations.part_mode(by_name["rag"], None, 4) == ("sequential", 1)
    assert ablations.part_mode(by_name["methods"], "sequential", 4) == ("sequential", 4)
    assert ablations.part_mode(by_name["rag"], "parallel", 3) == ("parallel", 3)
    good = dict(name="a", config=STAGES.replace("ablations/stages", "scratch"),
                sweep=dict(seeds=[0]))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"part 0 \('a'\): max_parallel="):
            ablations.parse_ablation(dict(parts=[{**good, "max_parallel": bad}]), tmp_path)


def test_report_header_names_every_code_version_a_resumed_ablation_ran(tmp_path):
    from train.experiments import stages_report

    runs = {}
    for i, commit in enumerate(["aaaa", "bbbb", "bbbb"]):
        trial_dir = tmp_path / f"t{i}"
        trial_dir.mkdir()
        (trial_dir / "run.json").write_text(json.dumps(
            {"environment": {"jax": "0.1"}, "code": {"git_commit": commit * 3}}))
        runs.setdefault("part", []).append(({}, None, str(trial_dir)))
    env, commits = stages_report._code_versions(runs)
    assert env == {"jax": "0.1"}
    assert commits == "runs from commits bbbbbbbbbb (2), aaaaaaaaaa (1)"
    one = {"part": runs["part"][1:]}
    assert stages_report._code_versions(one)[1] == "commit bbbbbbbbbb"
