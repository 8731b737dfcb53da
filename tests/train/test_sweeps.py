"""Sweeps: the declared trials exactly, reproducible random search, each trial's config
(colon arguments and fields), the report (CSV, Markdown mean ± std, PNGs), resuming a
killed sweep, and real sweeps end to end through the command line: --mode=parallel's
workers (each trial's results as --mode=sequential's, its own log; a killed worker)."""

import csv
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import finetune
from launch import sweep as launch_sweep
from train.experiments import sweep_report, sweeps

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG = b"\x89PNG\r\n\x1a\n"


def write_sweep_config(tmp_path, sweep, base="scratch"):
    """A config file in tmp_path: `configs/<base>.py`'s get_config plus get_sweep."""
    path = tmp_path / "tiny_sweep.py"
    path.write_text(f"from configs import {base}\n\n\n"
                    f"def get_config(arg=None):\n    return {base}.get_config(arg)\n\n\n"
                    f"def get_sweep(arg=None):\n    return {sweep!r}\n")
    return str(path)


def fake_results(config):
    """results.json as train_and_evaluate writes it, from the trial's config (no training):
    accuracy grows with the label fraction and differs a little by seed."""
    fraction, seed = config.data.label_fraction, config.seed
    accuracy = 0.3 + 0.4 * fraction + 0.01 * seed + 10 * config.optim.lr
    return {"step": config.train.num_steps, "train_time_s": 12.5 + seed,
            "parameters": {"total": 1000, "trainable": 250, "trainable_without_head": 200,
                           "by_module": {"encoder/block_0": 1000}},
            "peak_memory": {"compiled_step_bytes": 3_000_000, "device_peak_bytes": None},
            "data": {"label_fraction": fraction, "train_examples": int(1000 * fraction)},
            "validation": {"loss": 1.0, "accuracy": accuracy, "macro_f1": accuracy / 2},
            "test": {"loss": 1.1, "accuracy": accuracy - 0.05, "macro_f1": accuracy / 3}}


class FakeRunner:
    """Stands in for training: writes metrics.jsonl and results.json; counts calls."""

    def __init__(self, fail=(), interrupt=()):
        self.calls, self.fail, self.interrupt = [], set(fail), set(interrupt)

    def __call__(self, trial, config, workdir):
        self.calls.append(trial.name)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            for step in (1, 2, 3):
                f.write(json.dumps({"step": step, "train/loss": 3.0 / step,
                                    **({"eval/accuracy": 0.2 * step} if step > 1 else {})})
                        + "\n")
        if trial.name in self.interrupt:  # Killed mid-trial: no results.json.
            raise KeyboardInterrupt
        if trial.name in self.fail:
            raise FloatingPointError("diverged")
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(fake_results(config), f)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# --- Declaring and enumerating ---------------------------------------------------------


def test_grid_enumerates_exactly_the_declared_product():
    methods, fractions, seeds = ["full", "lora", "bitfit"], [0.01, 0.1, 1.0], [0, 1]
    spec = sweeps.parse_sweep({"grid": {"arg.method": methods,
                                        "config.data.label_fraction": fractions},
                               "seeds": seeds})
    trials = sweeps.enumerate_trials(spec)
    got = [(t.overrides["arg.method"], t.overrides["data.label_fraction"], t.seed)
           for t in trials]
    assert got == list(itertools.product(methods, fractions, seeds))  # Order too.
    assert len({t.name for t in trials}) == 18
    assert trials[0].name == "method=full,label_fraction=0.01,seed=0"
    assert trials[0].group == trials[1].group != trials[2].group  # Seeds share a group.


def test_random_search_is_reproducible_and_within_its_distributions():
    space = {"optim.lr": ("loguniform", 1e-5, 1e-2), "model.dropout": ("uniform", 0.0, 0.3),
             "train.num_steps": ("int", 100, 110), "model.lora_rank": ("choice", [4, 8, 16])}
    spec = sweeps.parse_sweep({"random": space, "num_trials": 30, "search_seed": 7})
    trials = sweeps.enumerate_trials(spec)
    assert trials == sweeps.enumerate_trials(spec)
    other = sweeps.enumerate_trials(sweeps.parse_sweep(
        {"random": space, "num_trials": 30, "search_seed": 8}))
    assert [t.overrides for t in other] != [t.overrides for t in trials]
    assert len(trials) == 30 and len({t.name for t in trials}) == 30
    values = {k: [t.overrides[k] for t in trials] for k in space}
    assert all(1e-5 <= v <= 1e-2 for v in values["optim.lr"])
    assert all(0.0 <= v <= 0.3 for v in values["model.dropout"])
    assert all(isinstance(v, int) and 100 <= v <= 110 for v in values["train.num_steps"])
    assert set(values["model.lora_rank"]) <= {4, 8, 16}
    # Log-uniform: about as many draws per decade (3 decades, 30 draws).
    decades = np.histogram(np.log10(values["optim.lr"]), bins=[-5, -4, -3, -2])[0]
    assert decades.min() >= 3, decades
    # Names carry the exact value run (rounded at the draw to 4 significant digits).
    assert all(float(f"{v:.4g}") == v for v in values["optim.lr"])


def test_random_draws_cross_the_grid_and_seeds():
    spec = sweeps.parse_sweep({"grid": {"arg.method": ["full", "lora"]},
                               "random": {"optim.lr": ("loguniform", 1e-4, 1e-2)},
                               "num_trials": 3, "seeds": [0, 1]})
    trials = sweeps.enumerate_trials(spec)
    assert len(trials) == 2 * 3 * 2
    lrs = {m: [t.overrides["optim.lr"] for t in trials if t.overrides["arg.method"] == m]
           for m in ("full", "lora")}
    assert lrs["full"] == lrs["lora"]  # The same draws for every grid point.


@pytest.mark.parametrize("raw, message", [
    ({"grid": {"optim.lr": 1e-3}}, "grid['optim.lr']"),
    ({"random": {"optim.lr": ("gaussian", 0, 1)}}, "random['optim.lr']"),
    ({"random": {"optim.lr": ("loguniform", 0.0, 1.0)}}, "loguniform needs 0 < low"),
    ({"random": {"model.lora_rank": ("int", 8, 4)}}, "low must be below high"),
    ({"random": {"model.lora_rank": ("choice", [4, 8])}, "num_trials": 3},
     "fewer than num_trials=3 distinct"),
    ({"grid": {"seed": [0, 1]}}, "seeds=[...]"),
    ({"grid": {"optim.lr": [1e-3]}, "random": {"optim.lr": ("uniform", 0, 1)}},
     "in both grid and random"),
    ({"grid": {"optim.lr": [1e-3]}, "metirc": "x"}, "Unknown sweep field(s) ['metirc']"),
    ({"grid": {"optim.lr": [1e-3]}, "mode": "best"}, "mode='best'"),
    ({}, "nothing varies"),
])
def test_bad_sweeps_fail_naming_the_key(raw, message):
    with pytest.raises(ValueError) as error:
        sweeps.enumerate_trials(sweeps.parse_sweep(raw))
    assert message in str(error.value)


@pytest.mark.parametrize("grid, message", [
    ({"optim.lrr": [1e-3]}, "Sweep key 'optim.lrr': the config has no field 'optim.lrr'; "
                            "did you mean 'optim.lr'?"),
    ({"arg.methd": ["lora"]}, "Unknown config argument 'methd'"),
    ({"arg.method": ["lorra"]}, "method='lorra'; expected one of"),
    ({"optim.lr": ["fast"]}, "Sweep key 'optim.lr'='fast'"),
])
def test_a_key_the_config_lacks_fails_naming_it(grid, message):
    trial = sweeps.enumerate_trials(sweeps.parse_sweep({"grid": grid}))[0]
    with pytest.raises(ValueError) as error:
        sweeps.trial_config("configs/finetune.py:runlocal", trial)
    assert message in str(error.value) and trial.name in str(error.value)


# --- A trial's config -------------------------------------------------------------------


def test_method_and_label_fraction_sweep_over_finetune():
    spec = sweeps.parse_sweep({"grid": {"arg.method": list(finetune.METHODS),
                                        "data.label_fraction": [0.1, 1.0]}, "seeds": [3]})
    for trial in sweeps.enumerate_trials(spec):
        config = sweeps.trial_config("configs/finetune.py:runlocal,lora_rank=4", trial,
                                     ["train.num_steps=7"])
        method = trial.overrides["arg.method"]
        expected = finetune.get_config(f"runlocal,lora_rank=4,method={method}")
        assert config.optim.param_rules == expected.optim.param_rules, method
        assert config.model.lora_rank == (4 if method == "lora" else 0)
        assert config.model.num_layers == 2  # runlocal kept.
        assert config.data.label_fraction == trial.overrides["data.label_fraction"]
        assert (config.seed, config.train.num_steps) == (3, 7)


def test_config_file_and_colon_flags_merge():
    trial = sweeps.Trial("t", {"config_file": "configs/finetune.py:runlocal",
                               "arg.method": "bitfit", "arg.norm_offsets": True}, None)
    assert sweeps.trial_config_path("configs/scratch.py", trial) == \
        "configs/finetune.py:runlocal,method=bitfit,norm_offsets=true"
    assert sweeps.trial_config("configs/scratch.py", trial).optim.param_rules[1] == \
        (r".*norm/bias", 1.0)


def test_trial_command_gives_launch_main_the_same_config():
    """--mode=print prints the command; --mode=sequential and parallel's workers build
    the config with sweeps.trial_config."""
    spec = sweeps.parse_sweep({"grid": {"arg.method": ["lora"], "optim.lr": [3.3e-4],
                                        "train.class_weighted_loss": [True],
                                        "optim.param_rules": [((r".*", 0.5),)]},
                               "seeds": [2]})
    trial = sweeps.enumerate_trials(spec)[0]
    cli = ["data.data_dir=/tmp/somewhere", "train.progress=false"]
    command = sweeps.trial_command("configs/finetune.py:runlocal", trial, "runs/s", cli)
    assert command[:4] == ["python", "-m", "launch.main",
                           "--config=configs/finetune.py:runlocal,method=lora"]
    assert command[4] == f"--workdir={os.path.join('runs/s', trial.name)}"
    argv = ["launch.main", command[3], *command[5:]]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    expected = sweeps.trial_config("configs/finetune.py:runlocal", trial, cli)
    assert flag_values.config.to_dict() == expected.to_dict()
    assert expected.optim.lr == 3.3e-4 and expected.seed == 2


# --- Running, resuming and the report -------------------------------------------------


def test_two_trial_sweep_writes_csv_markdown_and_plots(tmp_path):
    config = write_sweep_config(tmp_path, {"grid": {"optim.lr": [1e-3, 3e-3]}})
    workdir = str(tmp_path / "sweep")
    runner = FakeRunner()
    assert launch_sweep.run_sweep(config + ":runlocal", workdir, run_trial=runner) == []
    assert runner.calls == ["lr=0.001", "lr=0.003"]
    record = json.load(open(os.path.join(workdir, "sweep.json")))
    assert [t["name"] for t in record["trials"]] == runner.calls
    rows = read_csv(os.path.join(workdir, "results.csv"))
    assert [(r["trial"], r["status"], r["lr"]) for r in rows] == [
        ("lr=0.001", "done", "0.001"), ("lr=0.003", "done", "0.003")]
    assert float(rows[1]["validation/accuracy"]) == pytest.approx(0.3 + 0.4 + 0.03)
    assert float(rows[0]["parameters/trainable_percent"]) == 25.0
    assert rows[0]["peak_memory/compiled_step_bytes"] == "3000000"
    assert "parameters/by_module/encoder/block_0" not in rows[0]
    markdown = open(os.path.join(workdir, "results.md")).read()
    assert "| lr | seeds | validation/accuracy | test/accuracy |" in markdown
    assert "| 0.001 | 1 | 0.7100 | 0.6600 |" in markdown
    assert "| **0.003** | **1** | **0.7300** | **0.6800** |" in markdown  # Best: bold.
    assert "**Best** (by mean validation/accuracy, max): `lr=0.003` — " \
           "validation/accuracy 0.7300, test/accuracy 0.6800." in markdown
    for name in ("learning_curves.png", "metric_vs_parameters.png"):
        assert open(os.path.join(workdir, name), "rb").read(8) == PNG
        assert f"]({name})" in markdown
    assert not os.path.exists(os.path.join(workdir, "metric_vs_label_fraction.png"))


def test_mean_and_std_over_seeds_and_the_label_fraction_plot(tmp_path):
    sweep = {"grid": {"data.label_fraction": [0.1, 1.0]}, "seeds": [0, 1, 2],
             "metric": "validation/accuracy", "mode": "min"}
    workdir = str(tmp_path / "sweep")
    launch_sweep.run_sweep(write_sweep_config(tmp_path, sweep) + ":runlocal", workdir,
                           run_trial=FakeRunner())
    rows = read_csv(os.path.join(workdir, "results.csv"))
    assert len(rows) == 6 and {r["seed"] for r in rows} == {"0", "1", "2"}
    markdown = open(os.path.join(workdir, "results.md")).read()
    lr = 1e-3  # runlocal's scratch config.
    for fraction in (0.1, 1.0):
        accuracy = np.array([0.3 + 0.4 * fraction + 0.01 * s + 10 * lr for s in (0, 1, 2)])
        cell = f"{accuracy.mean():.4f} ± {np.std(accuracy, ddof=1):.4f}"
        times = np.array([12.5, 13.5, 14.5])
        time_cell = f"{times.mean():.1f} ± {np.std(times, ddof=1):.1f}"
        row = [line for line in markdown.splitlines() if line.startswith(f"| {fraction:g} ")]
        row = row or [line for line in markdown.splitlines()
                      if line.startswith(f"| **{fraction:g}** ")]
        assert cell in row[0] and time_cell in row[0] and "| 3 |" in row[0].replace("*", "")
    # mode=min: the lower label fraction wins.
    assert "`label_fraction=0.1`" in markdown.split("**Best**")[1]
    assert open(os.path.join(workdir, "metric_vs_label_fraction.png"), "rb").read(8) == PNG
    assert sweep_report.mean_std([1.0, 2.0, 4.0]) == pytest.approx(
        (np.mean([1, 2, 4]), np.std([1, 2, 4], ddof=1)))
    assert sweep_report.mean_std([5.0, None]) == (5.0, 0.0)


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    config = write_sweep_config(tmp_path, {"grid": {"optim.lr": [1e-3, 2e-3, 3e-3]}})
    config += ":runlocal"
    workdir = str(tmp_path / "sweep")
    with pytest.raises(KeyboardInterrupt):  # Killed during the second trial.
        launch_sweep.run_sweep(config, workdir, run_trial=FakeRunner(interrupt={"lr=0.002"}))
    assert os.path.exists(os.path.join(workdir, "lr=0.002", "metrics.jsonl"))
    resumed = FakeRunner(fail={"lr=0.003"})
    assert launch_sweep.run_sweep(config, workdir, run_trial=resumed) == ["lr=0.003"]
    assert resumed.calls == ["lr=0.002", "lr=0.003"]  # Not lr=0.001 again.
    rows = read_csv(os.path.join(workdir, "results.csv"))
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    again = FakeRunner()
    launch_sweep.run_sweep(config, workdir, run_trial=again)
    assert again.calls == ["lr=0.003"]


def test_print_mode_prints_the_unfinished_trials(tmp_path, capsys):
    config = write_sweep_config(tmp_path, {"grid": {"arg.method": ["full", "lora"]}},
                                base="finetune")
    workdir = str(tmp_path / "sweep")
    os.makedirs(os.path.join(workdir, "method=full"))
    open(os.path.join(workdir, "method=full", "results.json"), "w").write(
        json.dumps(fake_results(finetune.get_config("runlocal"))))
    launch_sweep.run_sweep(config + ":runlocal", workdir, mode="print",
                           cli_overrides=["data.data_dir=/data"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert shlex.split(lines[0]) == [
        "python", "-m", "launch.main", f"--config={config}:runlocal,method=lora",
        f"--workdir={workdir}/method=lora", "--config.data.data_dir=/data"]
    assert lines[1].startswith("# When they have finished: ") and "--mode=collect" in lines[1]
    assert len(lines) == 2


def tiny_overrides(data_dir):
    """Every trial: scratch runlocal on WordNet, 3 steps, 64 examples to evaluate."""
    return [f"data.data_dir={data_dir}", "train.num_steps=3", "train.log_every=1",
            "train.progress=false", "data.eval_split=validation[:64]",
            "data.test_split=test[:64]"]


def sweep_command(config, workdir, data_dir, max_parallel=2):
    return [sys.executable, "-m", "launch.sweep", f"--config={config}:runlocal",
            f"--workdir={workdir}", "--mode=parallel", f"--max_parallel={max_parallel}",
            *(f"--config.{o}" for o in tiny_overrides(data_dir))]


def starts(trial_dir):
    """The pids of the processes that trained this trial (run_history.jsonl)."""
    with open(os.path.join(trial_dir, "run_history.jsonl")) as f:
        return [json.loads(line)["pid"] for line in f]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_trial_that_raises_fails_alone_and_its_worker_goes_on(tmp_path):
    """--mode=parallel's worker: a trial that raises (here its config's check) is failed
    with the traceback in its own log, and the same worker takes the next trial, also in
    a later batch (a bayes search's, an ablation's next part), until a sequential part."""
    config = write_sweep_config(tmp_path, {"grid": {"train.log_every": [-1, -2]}})
    trials = sweeps.enumerate_trials(launch_sweep.load_sweep(config))
    workdir, reports, idle = tmp_path / "sweep", [], []
    (tmp_path / "next").mkdir()
    sequential = write_sweep_config(tmp_path / "next", {"grid": {"optim.lr": [1e-3]}})
    with launch_sweep.Workers() as workers:
        for trial in trials:  # One batch each.
            assert workers.run(config, str(workdir), [trial], (), 1,
                               lambda f: reports.append(list(f))) == [trial.name]
            idle.append([p.pid for p in workers.idle])
        launch_sweep.run_sweep(sequential, str(tmp_path / "next" / "sweep"),
                               run_trial=FakeRunner(), workers=workers)
        assert workers.idle == []  # Ended: trials train in this process now.
    assert reports == [["log_every=-1"], ["log_every=-2"]]
    pids = set()
    for own, other in (("-1", "-2"), ("-2", "-1")):
        text = (workdir / f"log_every={own}" / "train.log").read_text()
        (pid,) = re.findall(rf"Trial log_every={own} in sweep worker (\d+)", text)
        pids.add(int(pid))
        assert f"log_every={own} must be >= 1" in text and "Traceback" in text
        assert f"log_every={other}" not in text
        assert not (workdir / f"log_every={own}" / "results.json").exists()
    (pid,) = pids  # One worker for both, idle between them.
    assert idle == [[pid], [pid]] and pid != os.getpid() and not alive(pid)


@pytest.mark.slow
def test_real_sweep_end_to_end_through_the_command_line(wordnet_data_dir, tmp_path):
    """Three real trials (scratch runlocal, 3 steps) in --mode=parallel's two workers:
    the report; each trial's results as --mode=sequential trains it; each log its own.
    The trials differ in their label fraction only: one program, compiled once (by the
    sequential run, into the test session's cache)."""
    names = ["label_fraction=0.25", "label_fraction=0.5", "label_fraction=1"]
    config = write_sweep_config(tmp_path, {"grid": {"data.label_fraction": [0.25, 0.5, 1.0]}})
    overrides = tiny_overrides(wordnet_data_dir)
    sequential = tmp_path / "sequential"  # One after another in this process.
    assert launch_sweep.run_sweep(f"{config}:runlocal", str(sequential),
                                  cli_overrides=overrides) == []
    workdir = tmp_path / "sweep"
    run = subprocess.run(sweep_command(config, workdir, wordnet_data_dir), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = read_csv(workdir / "results.csv")
    assert [(r["trial"], r["status"], r["step"]) for r in rows] == [
        (name, "done", "3") for name in names]
    for row in rows:
        assert 0.0 <= float(row["validation/accuracy"]) <= 1.0
        assert 0.0 <= float(row["test/macro_f1"]) <= 1.0
        assert float(row["parameters/trainable_percent"]) == 100.0
    results = {n: json.load(open(workdir / n / "results.json")) for n in names}
    assert float(rows[2]["test/accuracy"]) == results[names[2]]["test[:64]"]["accuracy"]
    assert "| label_fraction | seeds | validation/accuracy |" in (
        workdir / "results.md").read_text()
    assert (workdir / "learning_curves.png").read_bytes()[:8] == PNG

    # Each trial's results as the sequential run's.
    for name in names:
        expected = json.load(open(sequential / name / "results.json"))
        assert starts(sequential / name) == [os.getpid()]
        assert results[name]["step"] == expected["step"] == 3
        assert results[name]["data"] == expected["data"]
        for split in ("validation[:64]", "test[:64]"):
            assert results[name][split] == pytest.approx(expected[split], rel=1e-5), name

    # Two workers trained the three trials, each trial in one start; they have exited.
    pids = {n: starts(workdir / n) for n in names}
    assert all(len(p) == 1 for p in pids.values()), pids
    workers = {p[0] for p in pids.values()}
    assert len(workers) == 2 and os.getpid() not in workers, pids
    assert not any(alive(pid) for pid in workers)
    for name in names:
        assert f"Started {name} in worker {pids[name][0]} " in run.stderr

    # Each train.log holds its own trial (its header, the results it printed), no other's.
    losses = {n: r["validation[:64]"]["loss"] for n, r in results.items()}
    assert len(set(losses.values())) == 3, losses  # Tells the trials apart.
    for name in names:
        text = (workdir / name / "train.log").read_text()
        headers = re.findall(r"Trial (\S+) in sweep worker (\d+)", text)
        assert headers == [(name, str(pids[name][0]))], (name, headers)
        printed = json.loads(re.search(r"^\{$.*?^\}$", text, re.M | re.S).group())
        assert printed == results[name]
        assert "Mesh {" in text

    # Re-running finds all finished: nothing trains again.
    again = FakeRunner()
    launch_sweep.run_sweep(f"{config}:runlocal", str(workdir), run_trial=again,
                           cli_overrides=overrides)
    assert again.calls == []
    assert read_csv(workdir / "results.csv") == rows


@pytest.mark.slow
def test_a_killed_worker_fails_its_trial_and_the_sweep_goes_on(wordnet_data_dir, tmp_path,
                                                               monkeypatch):
    """SIGKILL to the worker training seed=0 (one worker at a time): that trial fails, a
    new worker trains seed=1; re-running the sweep trains seed=0 to the end."""
    config = write_sweep_config(tmp_path, {"seeds": [0, 1]})
    workdir = tmp_path / "sweep"
    jax.devices()  # This process keeps its 8 fake devices (root conftest.py); the
    monkeypatch.setenv("XLA_FLAGS", "")  # workers train on one: faster here.
    # No compilation cache: a worker killed mid-write would leave a truncated entry for
    # the others to load (root conftest.py).
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    output = open(tmp_path / "sweep.log", "w")  # A pipe unread here could fill up.
    sweep = subprocess.Popen(sweep_command(config, workdir, wordnet_data_dir, 1), cwd=REPO,
                             env=env, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while sweep.poll() is None and time.monotonic() < deadline:
        try:  # Written as the trial's training starts; results.json comes seconds later.
            (killed,) = starts(workdir / "seed=0")
            break
        except (OSError, ValueError):
            time.sleep(0.02)
    else:
        sweep.kill()
        pytest.fail(f"seed=0 never started: {(tmp_path / 'sweep.log').read_text()[-3000:]}")
    os.kill(killed, signal.SIGKILL)
    sweep.wait(timeout=600)
    output.close()
    log = (tmp_path / "sweep.log").read_text()
    assert sweep.returncode == 1, log[-3000:]
    assert "1 trial(s) failed: seed=0" in log
    assert re.search(r"Trial seed=0 failed \(its worker died: exit -9\); see \S+/seed=0/"
                     r"train\.log", log), log[-3000:]
    assert not (workdir / "seed=0" / "results.json").exists()
    (other,) = starts(workdir / "seed=1")
    assert other not in (killed, os.getpid())
    assert f"Started seed=1 in worker {other} " in log
    assert [(r["trial"], r["status"]) for r in read_csv(workdir / "results.csv")] == [
        ("seed=0", "failed"), ("seed=1", "done")]

    # The same sweep again (from here, its own workers): only seed=0 trains, to the end.
    assert launch_sweep.run_sweep(f"{config}:runlocal", str(workdir), mode="parallel",
                                  cli_overrides=tiny_overrides(wordnet_data_dir)) == []
    first, resumed = starts(workdir / "seed=0")
    assert first == killed and resumed not in (killed, other, os.getpid())
    assert not alive(resumed) and starts(workdir / "seed=1") == [other]
    assert [r["status"] for r in read_csv(workdir / "results.csv")] == ["done"] * 2
    assert json.load(open(workdir / "seed=0" / "results.json"))["step"] == 3


def test_a_metric_off_the_eval_split_fails_before_any_trial(tmp_path):
    config = write_sweep_config(tmp_path, {"grid": {"optim.lr": [1e-3]},
                                           "metric": "dev/accuracy"})
    runner = FakeRunner()
    with pytest.raises(ValueError, match=r"metric='dev/accuracy' is not on the trials' eval"):
        launch_sweep.run_sweep(config, str(tmp_path / "sweep"), run_trial=runner)
    assert runner.calls == []
