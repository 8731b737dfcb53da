"""Bayesian search in sweeps (search="bayes", optuna's TPE): the space's mapping onto
optuna distributions, TPE against random search on an analytic function, a killed
search resumed without repeating a trial, the report's best-so-far curve, the
random-vs-bayes comparison, and bad declarations."""

import json
import math
import os

import numpy as np
import optuna
import pytest
from test_sweeps import PNG, FakeRunner, read_csv, write_sweep_config  # tests/train/

from launch import sweep as launch_sweep
from train.experiments import sweep_report, sweeps

SPACE = {"optim.lr": ("loguniform", 1e-5, 1e-1), "train.num_steps": ("int", 100, 2000),
         "model.dropout": ("uniform", 0.0, 0.5), "model.lora_rank": ("choice", [4, 8, 16, 32])}


def score(overrides):
    """An analytic stand-in for a validation score over SPACE: best at lr 10^-2.5, 1,400
    steps, dropout 0.1 and rank 16 (0 there; negative elsewhere)."""
    return (-(math.log10(overrides["optim.lr"]) + 2.5) ** 2
            - ((overrides["train.num_steps"] - 1400) / 600) ** 2
            - 4 * (overrides["model.dropout"] - 0.1) ** 2
            - 0.3 * (overrides["model.lora_rank"] != 16))


class AnalyticRunner:
    """Runs a batch of trials in-process: results.json holds score(overrides) + seed/100;
    records each call, and raises KeyboardInterrupt (a kill) at the trial named `kill`
    before (or, with `after`, after) writing its results."""

    def __init__(self, workdir, kill=None, after=False):
        self.workdir, self.kill, self.after, self.calls = workdir, kill, after, []

    def write(self, trial):
        self.calls.append(trial)
        if trial.name == self.kill and not self.after:
            raise KeyboardInterrupt
        directory = os.path.join(self.workdir, trial.name)
        os.makedirs(directory, exist_ok=True)
        accuracy = score(trial.overrides) + (trial.seed or 0) / 100
        with open(os.path.join(directory, "results.json"), "w") as f:
            json.dump({"validation": {"accuracy": accuracy}}, f)
        if trial.name == self.kill:
            raise KeyboardInterrupt

    def __call__(self, trials):
        return sweeps.run_trials(self.workdir, trials, self.write)


def best_curve(workdir, spec):
    trials = sweeps.sweep_trials(spec, workdir)
    groups = sweep_report.group_rows(sweep_report.collect_rows(workdir, trials), trials)
    return sweep_report.search_curves(groups, spec)["all"]


def bayes_spec(num_trials=6, **fields):
    return sweeps.parse_sweep({"random": SPACE, "num_trials": num_trials, "search": "bayes",
                               **fields})


# --- The space in optuna ----------------------------------------------------------------


def test_space_declarations_map_onto_optuna_distributions(tmp_path):
    spec = bayes_spec()
    assert sweeps.optuna_distributions(spec) == {
        "optim.lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True),
        "train.num_steps": optuna.distributions.IntDistribution(100, 2000),  # Inclusive.
        "model.dropout": optuna.distributions.FloatDistribution(0.0, 0.5),
        "model.lora_rank": optuna.distributions.CategoricalDistribution([4, 8, 16, 32])}
    assert spec.startup_trials == 2  # A third of 6 trials, at least 2.
    assert bayes_spec(60).startup_trials == 10 and bayes_spec(9).startup_trials == 3
    runner = AnalyticRunner(str(tmp_path))
    sweeps.BayesSearch(str(tmp_path), spec).run(runner)
    for trial in runner.calls:  # Drawn inside the space and rounded as random draws are.
        lr, steps = trial.overrides["optim.lr"], trial.overrides["train.num_steps"]
        assert 1e-5 <= lr <= 1e-1 and float(f"{lr:.4g}") == lr
        assert isinstance(steps, int) and 100 <= steps <= 2000
        assert 0.0 <= trial.overrides["model.dropout"] <= 0.5
        assert trial.overrides["model.lora_rank"] in (4, 8, 16, 32)


def test_probe_trials_reach_every_choice_and_bound():
    spec = sweeps.parse_sweep({"grid": {"arg.method": ["lora", "full"]}, "random": SPACE,
                               "num_trials": 3, "search": "bayes", "seeds": [5, 6]})
    probes = sweeps.probe_trials(spec)
    assert len(probes) == 2 * 4 and {t.seed for t in probes} == {5}
    for method in ("lora", "full"):
        mine = [t.overrides for t in probes if t.overrides["arg.method"] == method]
        assert [o["model.lora_rank"] for o in mine] == [4, 8, 16, 32]
        assert {o["optim.lr"] for o in mine} == {1e-5, 1e-1}
        assert {o["train.num_steps"] for o in mine} == {100, 2000}


# --- TPE against random search -----------------------------------------------------------


def test_tpe_beats_random_search_on_an_analytic_function(tmp_path):
    """20 trials, search seeds 0-4, the same space and objective. Measured: mean best
    -0.280 (TPE) vs -0.551 (random), TPE ahead on 4 of 5 seeds (10 seeds: +0.28, 9 of
    10, permutation p = 0.0002)."""
    finals = {}
    for search in ("bayes", "random"):
        for seed in range(5):
            spec = sweeps.parse_sweep({"random": SPACE, "num_trials": 20, "search": search,
                                       "search_seed": seed})
            workdir = str(tmp_path / f"{search}{seed}")
            runner = AnalyticRunner(workdir)
            if search == "bayes":
                sweeps.BayesSearch(workdir, spec).run(runner)
            else:
                runner(sweeps.enumerate_trials(spec))
            assert len(runner.calls) == 20
            curve = best_curve(workdir, spec)
            assert len(curve) == 20 and curve == sorted(curve)  # Best so far: monotone.
            finals.setdefault(search, []).append(curve[-1])
    bayes, random = np.array(finals["bayes"]), np.array(finals["random"])
    assert bayes.mean() - random.mean() > 0.15, (bayes, random)
    assert np.sum(bayes >= random) >= 4, (bayes, random)


# --- Resuming a killed search ------------------------------------------------------------


@pytest.mark.parametrize("after", [False, True], ids=["mid-trial", "before-tell"])
def test_killed_search_resumes_without_repeating_a_trial(tmp_path, after):
    """Killed in the 4th parameter set's second seed (or after it finished, before the
    study was told): the resumed search re-runs that set's unfinished trial with its
    parameters, asks the rest, and ends with the trials an uninterrupted search runs."""
    spec = bayes_spec(num_trials=7, seeds=[0, 1], startup_trials=3, search_seed=4)
    straight_dir = str(tmp_path / "straight")
    straight = AnalyticRunner(straight_dir)
    sweeps.BayesSearch(straight_dir, spec).run(straight)
    names = [t.name for t in straight.calls]
    assert len(names) == 14 == len(set(names))
    groups = [t.group for t in straight.calls]
    assert len(set(groups)) == 7  # No parameter set twice.

    workdir = str(tmp_path / "killed")
    killed = AnalyticRunner(workdir, kill=names[7], after=after)
    with pytest.raises(KeyboardInterrupt):
        sweeps.BayesSearch(workdir, spec).run(killed)
    assert [t.name for t in killed.calls] == names[:8]
    with open(os.path.join(workdir, sweeps.JOURNAL), "ab") as f:
        f.write(b'{"op_code":4,"worker_id":"x')  # A kill in the middle of a journal line.
    resumed = AnalyticRunner(workdir)
    assert sweeps.BayesSearch(workdir, spec).run(resumed) == []
    expected = names[8:] if after else names[7:]  # The killed trial again, same parameters.
    assert [t.name for t in resumed.calls] == expected
    assert [t.name for t in sweeps.sweep_trials(spec, workdir)] == names
    # Every parameter set told once, with the mean over its seeds.
    study = sweeps.BayesSearch(workdir, spec).study({})
    told = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(told) == 7
    assert told[0].value == pytest.approx(score(straight.calls[0].overrides) + 0.005)
    # Nothing left to do: a third run runs nothing.
    again = AnalyticRunner(workdir)
    sweeps.BayesSearch(workdir, spec).run(again)
    assert again.calls == []


def test_failed_set_is_retried_on_the_next_run_and_then_told(tmp_path):
    spec = bayes_spec(num_trials=3, search_seed=1)
    workdir = str(tmp_path)
    runner, batches = AnalyticRunner(workdir), []

    def run_batch(trials):  # The second parameter set diverges: no results.json.
        batches.append(trials[0].name)
        return [trials[0].name] if len(batches) == 2 else runner(trials)

    assert sweeps.BayesSearch(workdir, spec).run(run_batch) == [batches[1]]
    study = sweeps.BayesSearch(workdir, spec).study({})
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "FAIL", "COMPLETE"]
    retry = AnalyticRunner(workdir)
    assert sweeps.BayesSearch(workdir, spec).run(retry) == []
    assert [t.name for t in retry.calls] == [batches[1]]  # Retried; nothing new asked.
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[3].params == trials[1].params  # Added with its value.
    assert trials[3].value == pytest.approx(score(retry.calls[0].overrides))


def test_parallel_workers_get_batches_of_distinct_sets_asked_together(tmp_path):
    spec = bayes_spec(num_trials=7, seeds=[0, 1], startup_trials=2)
    runner, batches = AnalyticRunner(str(tmp_path)), []

    def run_batch(trials):
        batches.append(len(trials))
        return runner(trials)

    assert sweeps.BayesSearch(str(tmp_path), spec).run(run_batch, batch_size=3) == []
    assert batches == [6, 6, 2]  # 3 + 3 + 1 parameter sets, 2 seeds each.
    assert len({t.group for t in runner.calls}) == 7


# --- Through launch.sweep: report and comparison ------------------------------------------


@pytest.fixture
def no_trial_plots(monkeypatch):
    """The per-trial plots (seconds of matplotlib; tests/train/test_sweeps.py draws them)."""
    for name in ("plot_learning_curves", "plot_metric_vs_parameters"):
        monkeypatch.setattr(sweep_report, name, lambda *args: None)


def test_bayes_sweep_through_run_sweep_reports_best_so_far(tmp_path, no_trial_plots):
    sweep = {"random": {"optim.lr": ("loguniform", 1e-4, 1e-2)}, "num_trials": 4,
             "search": "bayes", "seeds": [0, 1]}
    config = write_sweep_config(tmp_path, sweep) + ":runlocal"
    workdir = str(tmp_path / "sweep")
    runner = FakeRunner()
    assert launch_sweep.run_sweep(config, workdir, run_trial=runner) == []
    assert len(runner.calls) == 8 == len(set(runner.calls))
    record = json.load(open(os.path.join(workdir, "sweep.json")))
    assert [t["name"] for t in record["trials"]] == runner.calls
    assert record["spec"]["search"] == "bayes"
    rows = read_csv(os.path.join(workdir, "results.csv"))
    assert [r["trial"] for r in rows] == runner.calls and {r["status"] for r in rows} == {
        "done"}
    assert open(os.path.join(workdir, "best_so_far.png"), "rb").read(8) == PNG
    assert "](best_so_far.png)" in open(os.path.join(workdir, "results.md")).read()
    again = FakeRunner()  # Finished: collect and re-run find every trial done.
    launch_sweep.run_sweep(config, workdir, mode="collect", run_trial=again)
    launch_sweep.run_sweep(config, workdir, run_trial=again)
    assert again.calls == [] and read_csv(os.path.join(workdir, "results.csv")) == rows
    with pytest.raises(ValueError, match="--mode=print: a search='bayes' sweep"):
        launch_sweep.run_sweep(config, workdir, mode="print")


def test_compare_searches_writes_best_so_far_over_search_seeds(tmp_path, no_trial_plots):
    sweep = {"random": {"optim.lr": ("loguniform", 1e-4, 1e-2)}, "num_trials": 3}
    config = write_sweep_config(tmp_path, sweep) + ":runlocal"
    runner = FakeRunner()
    failed, outputs = launch_sweep.compare_searches(config, str(tmp_path / "cmp"), 2,
                                                    run_trial=runner)
    assert failed == [] and len(runner.calls) == 2 * 2 * 3
    for search in ("random", "bayes"):
        for seed in (0, 1):
            assert os.path.exists(tmp_path / "cmp" / search / f"search_seed={seed}" /
                                  "results.md")
    assert set(outputs["final"]) == {"random", "bayes"} and 0 < outputs["p_value"] <= 1
    markdown = open(outputs["markdown"]).read()
    assert "| trials | random | bayes | difference (bayes − random) | permutation p |" \
        in markdown
    assert "not significant" in markdown  # 2 against 2 seeds never is.
    assert open(outputs["plot"], "rb").read(8) == PNG


def test_best_so_far_and_the_permutation_test():
    assert sweep_report.best_so_far([0.2, math.nan, 0.1, 0.5], "max") == [0.2, 0.2, 0.2, 0.5]
    assert sweep_report.best_so_far([math.nan, 3.0, 1.0], "min")[1:] == [3.0, 1.0]
    # 3 against 3, fully separated: 2 of the 20 splits are as extreme.
    assert sweep_report.permutation_p_value([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    assert sweep_report.permutation_p_value([1, 2, 3], [1, 2, 3]) == 1.0


def test_the_search_config_declares_a_space_its_trials_accept():
    """configs/search.py: the README's measured comparison."""
    spec = launch_sweep.load_sweep("configs/search.py:search=bayes,trials=5")
    assert (spec.search, spec.num_trials, spec.metric) == ("bayes", 5, "validation/loss")
    for trial in sweeps.probe_trials(spec):
        config = launch_sweep.checked_config("configs/search.py", trial)
        assert config.optim.lr == trial.overrides["optim.lr"]


# --- Bad declarations ---------------------------------------------------------------------


@pytest.mark.parametrize("raw, message", [
    ({"grid": {"optim.lr": [1e-3]}, "search": "bayes"},
     "search='bayes' without a `random` search space"),
    ({"random": SPACE, "search": "tpe"}, "search='tpe'; expected one of ('random', 'bayes')"),
    ({"random": {"optim.param_rules": ("choice", [((".*", 0.5),), ((".*", 1.0),)])},
      "num_trials": 2, "search": "bayes"}, "Sweep random['optim.param_rules']="),
    ({"random": {"model.lora_rank": ("choice", [4, 4])}, "num_trials": 2, "search": "bayes"},
     "random['model.lora_rank']=('choice', [4, 4]) repeats a choice"),
    ({"random": SPACE, "startup_trials": 3}, "startup_trials=3 is for search='bayes'"),
    ({"random": SPACE, "num_trials": 4, "search": "bayes", "startup_trials": 5},
     "startup_trials=5: expected 1 to num_trials (4)"),
])
def test_bad_bayes_sweeps_fail_naming_the_key(raw, message):
    with pytest.raises(ValueError) as error:
        sweeps.parse_sweep(raw)
    assert message in str(error.value)


def test_a_changed_space_is_refused_on_resume(tmp_path):
    spec = bayes_spec(num_trials=2)
    sweeps.BayesSearch(str(tmp_path), spec).run(AnalyticRunner(str(tmp_path)))
    changed = sweeps.parse_sweep({"random": {**SPACE, "model.dropout": ("uniform", 0, 0.3)},
                                  "num_trials": 2, "search": "bayes"})
    with pytest.raises(ValueError, match="study 'search' searched .* but the sweep now"):
        sweeps.BayesSearch(str(tmp_path), changed).run(AnalyticRunner(str(tmp_path)))
