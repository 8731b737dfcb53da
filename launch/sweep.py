r"""Runs the sweep a config declares (`get_sweep(arg)`, train/experiments/sweeps.py) and reports it.

  python -m launch.sweep --config configs/finetune.py:runlocal --workdir runs/sweep
  python -m launch.sweep --config configs/X.py --workdir W --mode=parallel --max_parallel=4
  python -m launch.sweep --config configs/X.py --workdir W --mode=print   # for a cluster
  python -m launch.sweep --config configs/X.py --workdir W --mode=collect # after it ran

Modes: `sequential` (default) trains the trials one after another in this process;
`parallel` trains `--max_parallel` at once, in as many worker processes
(launch/sweep_worker.py) that each train the trials handed to them one after another,
in process, so start-up (importing jax, measuring peak FLOP/s, ...) is paid once a
worker for the whole command, not once a trial; each trial logs to `W/<trial>/train.log`,
a trial whose worker dies fails (a new worker takes the next trial), and SIGTERM or
Ctrl-C stops the running trials at a checkpoint; `print` prints each unfinished trial's
`launch.main` command; `collect` only writes the report. `--config.<field>=<value>`
(after `--config`) applies to every trial, e.g. `--config.data.data_dir=...`.

A config defining `get_ablation(arg)` (train/experiments/ablations.py) runs its parts in order, each
a sweep in `W/<part>/` as above, then writes `W/report.md`:

  python -m launch.sweep --config configs/ablations/stages.py --workdir runs/stages

A sweep with `search="bayes"` (optuna's TPE, train/experiments/sweeps.py) asks each trial
from the results before it: sequential mode runs one parameter set at a time, parallel
mode `--max_parallel` at a time (asked together), and `print` is refused.
`--compare_searches=N` runs the config's search space with random and with bayes search,
N search seeds each (`W/<search>/search_seed=<s>/`, each a sweep as above) and writes
`W/search_comparison.md` and `.png`: best-so-far against trials at equal trial counts.

  python -m launch.sweep --config configs/search.py --workdir runs/search --compare_searches=3

`W/sweep.json` (the trial list; a bayes search's so far) is written before anything
runs. Trials whose `W/<trial>/results.json` is complete are skipped, so re-running a killed
sweep runs only the rest (a half-finished trial resumes from its checkpoints; a bayes
search re-runs a trial it asked with the same parameters). At the end, and after each
trial, `W/results.csv` and `W/results.md` are rewritten (the PNG plots at the end;
`--mode=collect` redraws them any time).
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import select
import shlex
import signal
import subprocess
import sys
import time

from absl import app, flags
from absl import logging as absl_logging

from train.experiments import ablations, sweep_report, sweeps


def define_flags():
    """Defined only when run as a program: tests import `run_sweep` beside other entry
    points' flags of the same names."""
    flags.DEFINE_string("config", None, "Config file (`path.py[:args]`) defining "
                        "get_sweep(arg) beside get_config(arg).")
    flags.DEFINE_string("workdir", None, "Sweep directory: one subdirectory a trial.")
    flags.DEFINE_enum("mode", "sequential", ["sequential", "parallel", "print", "collect"],
                      "How to run the trials (see the module docstring).")
    flags.DEFINE_integer("max_parallel", 2, "Trials at once in --mode=parallel.")
    flags.DEFINE_integer("compare_searches", 0, "N > 0: run the sweep's search space with "
                         "random and with bayes search, N search seeds each, and write "
                         "W/search_comparison.md (see the module docstring).")
    flags.mark_flags_as_required(["config", "workdir"])

log = logging.getLogger("strata")
_cli_overrides = []  # "field=value" from the command line's --config.<field>=<value>.


def load_sweep(config_path):
    """The SweepSpec of `config_path`'s get_sweep(arg)."""
    path, arg = sweeps.split_config_path(config_path)
    module = sweeps.load_config_module(path)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} defines no get_sweep(arg); see train/experiments/sweeps.py")
    return sweeps.parse_sweep(module.get_sweep(arg) if arg else module.get_sweep())


def checked_config(config_path, trial, cli_overrides=()):
    """The trial's config, validated (config_checks) and locked; errors name the trial."""
    from train.config_checks import validate

    config = sweeps.trial_config(config_path, trial, cli_overrides)
    try:
        validate(config)
    except ValueError as error:
        raise ValueError(f"Trial {trial.name}: {error}") from error
    config.lock()
    return config


def prepare(config_path, workdir, cli_overrides=(), spec=None, trials=None):
    """-> (spec, trials, {trial name: config}, the trials' test split). Every trial's
    config is built and checked before anything runs, so a bad sweep key fails now,
    naming it; sweep.json is written.
    A bayes search's trials are those asked so far; its keys and values are checked on
    `sweeps.probe_trials` (every choice, every bound), whose configs are not returned.
    `spec` (a SweepSpec) replaces the config file's own get_sweep, `trials` its trials
    (ablation parts: with their `{best:...}` values set)."""
    spec = spec or load_sweep(config_path)
    trials = trials if trials is not None else sweeps.sweep_trials(spec, workdir)
    configs = {t.name: checked_config(config_path, t, cli_overrides) for t in trials}
    probes = [checked_config(config_path, t, cli_overrides)
              for t in (sweeps.probe_trials(spec) if spec.search == "bayes" else ())]
    splits = {sweep_report.split_name(c.data.eval_split) for c in [*configs.values(), *probes]}
    if spec.metric.split("/")[0] not in splits:
        raise ValueError(f"Sweep metric={spec.metric!r} is not on the trials' eval split "
                         f"{sorted(splits)} (config.data.eval_split)")
    sweeps.write_sweep_record(workdir, config_path, spec, trials, cli_overrides)
    log.info("Sweep of %d trials in %s (%d finished)%s", len(trials), workdir,
             sum(sweeps.is_finished(workdir, t) for t in trials),
             f"; {spec.search} search to {spec.num_trials} trials a grid point"
             if spec.search == "bayes" else "")
    return spec, trials, configs, (probes or list(configs.values()))[0].data.test_split


def train_in_process(trial, config, workdir):
    """Trains one trial here, as launch.main would (one process: a multi-host trial
    runs from --mode=print's commands); -> its results."""
    import jax

    from launch import run_task

    # Set per trial: an earlier trial's choice must not leak into this one.
    jax.config.update("jax_default_prng_impl", config.prng_impl or "threefry2x32")
    try:
        results = run_task.run(config, workdir)
    finally:  # Each trial compiles its own steps; don't keep every trial's executables.
        jax.clear_caches()
    if "preempted_at_step" in results:  # SIGTERM: the trial saved; end the sweep too.
        raise SystemExit(f"Preempted during trial {trial.name}; re-run to resume")
    return results


def prepare_data(configs):
    """Builds each distinct dataset and tokenizer once, here, before trials start in
    parallel: concurrent processes would each build them into the same directory."""
    from train import tasks

    seen = set()
    for config in configs.values():
        key = json.dumps(config.data.to_dict(), sort_keys=True, default=repr)
        if key not in seen:
            seen.add(key)
            tasks.loop_task(config.task).prepare_data(config.data)


class Workers:
    """--mode=parallel's `launch.sweep_worker` processes: each trains the trials it is
    handed in process, one after another, so it imports jax, measures the peak FLOP/s and
    loads data once, not per trial. Started as trials need them and kept for the sweep's
    later batches (a bayes search's) and an ablation's later parts; ended on exit."""

    def __init__(self):
        self.idle = []

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.end_idle(0)

    def run(self, config_path, workdir, trials, cli_overrides, max_parallel, on_done):
        """Trains the unfinished trials, `max_parallel` at once, `on_done(failed)` after
        each; returns the names of the failed trials (no complete results.json, or their
        worker died: a new one takes the next trial)."""
        pending = [t for t in trials if not sweeps.is_finished(workdir, t)]
        busy, failed = {}, []  # A worker's stdout fd -> (worker, its trial, the trial's log).
        self.end_idle(max_parallel)
        previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            while pending or busy:
                while pending and len(busy) < max_parallel:
                    trial, process = pending.pop(0), self.take()
                    trial_log = os.path.join(workdir, trial.name, "train.log")
                    os.makedirs(os.path.dirname(trial_log), exist_ok=True)
                    log.info("Started %s in worker %d (log: %s)", trial.name, process.pid,
                             trial_log)
                    with contextlib.suppress(BrokenPipeError):  # Dead: reported below.
                        pickle.dump((config_path, workdir, trial, tuple(cli_overrides)),
                                    process.stdin)
                        process.stdin.flush()
                    busy[process.stdout.fileno()] = (process, trial, trial_log)
                ready, _, _ = select.select(list(busy), [], [], 1.0)
                for fd, (process, trial, trial_log) in list(busy.items()):
                    if fd in ready and os.read(fd, 4096):  # "<trial>\n": idle again.
                        self.idle.append(process)
                        died = ""
                    elif fd in ready or process.poll() is not None:  # EOF: it is gone.
                        try:
                            process.wait(timeout=60)
                        except subprocess.TimeoutExpired:  # Closed its channel, yet lives.
                            process.kill()
                        died = f" (its worker died: exit {end(process)})"
                    else:
                        continue
                    del busy[fd]
                    if died or not sweeps.is_finished(workdir, trial):
                        log.error("Trial %s failed%s; see %s", trial.name, died, trial_log)
                        failed.append(trial.name)
                    else:
                        log.info("Finished %s", trial.name)
                    on_done(failed)
        except BaseException:  # Interrupted: SIGTERM makes each trial checkpoint and exit.
            for process, _, _ in busy.values():
                process.terminate()
            for process, _, _ in busy.values():
                end(process)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        return failed

    def take(self):
        """An idle worker still alive, else a new one."""
        while self.idle:
            process = self.idle.pop()
            if process.poll() is None:
                return process
            end(process)
        # Several processes share the accelerator: none may pre-allocate most of its memory.
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        return subprocess.Popen([sys.executable, "-m", "launch.sweep_worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def end_idle(self, keep):
        """Ends all idle workers but `keep` (EOF on their stdin ends one)."""
        ending, self.idle = self.idle[keep:], self.idle[:keep]
        for process in ending:
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
        for process in ending:
            end(process)


def end(process):
    """Waits for a worker to exit, closes its pipes; -> its exit status."""
    code = process.wait()
    for pipe in (process.stdin, process.stdout):
        with contextlib.suppress(BrokenPipeError):
            pipe.close()
    return code


def _terminated(*_):
    """SIGTERM to the sweep: end it as Ctrl-C does, its workers' trials checkpointing."""
    raise SystemExit("Sweep terminated (SIGTERM); re-run the same command to resume")


def run_sweep(config_path, workdir, mode="sequential", max_parallel=2, cli_overrides=(),
              run_trial=train_in_process, spec=None, trials=None, workers=None):
    """Runs (or prints) the unfinished trials, then writes the report; returns the names
    of failed trials. `run_trial(trial, config, trial_workdir)` trains one trial in
    sequential mode (tests pass a cheap stand-in); `spec` and `trials` as in prepare;
    `workers`: the Workers parallel mode trains in (the caller's, kept for its next
    sweeps), else its own."""
    if mode == "parallel" and workers is None:
        with Workers() as workers:
            return run_sweep(config_path, workdir, mode, max_parallel, cli_overrides,
                             run_trial, spec, trials, workers)
    spec, trials, configs, test_split = prepare(config_path, workdir, cli_overrides, spec,
                                                trials)
    bayes = sweeps.BayesSearch(workdir, spec) if spec.search == "bayes" else None
    if bayes and mode == "print":
        raise ValueError("--mode=print: a search='bayes' sweep asks each trial from the "
                         "results before it, so it has no command list; run it with "
                         "--mode=sequential or --mode=parallel")
    failed = []

    def current_trials():
        return bayes.trials() if bayes else trials

    def report(batch_failed=(), plots=False):  # Tables after each trial; plots at the end.
        return sweep_report.write_report(workdir, spec, current_trials(),
                                         [*failed, *batch_failed], test_split, plots)

    def config_of(trial):
        if trial.name not in configs:
            configs[trial.name] = checked_config(config_path, trial, cli_overrides)
        return configs[trial.name]

    def run_here(batch):
        return sweeps.run_trials(
            workdir, batch,
            lambda t: run_trial(t, config_of(t), os.path.join(workdir, t.name)),
            on_done=report)

    def run_in_workers(batch):
        prepare_data({t.name: config_of(t) for t in batch
                      if not sweeps.is_finished(workdir, t)})
        return workers.run(config_path, workdir, batch, cli_overrides, max_parallel, report)

    if mode == "print":
        for trial in trials:
            if not sweeps.is_finished(workdir, trial):
                print(shlex.join(sweeps.trial_command(config_path, trial, workdir,
                                                      cli_overrides)))
        collect = ["python", "-m", "launch.sweep", f"--config={config_path}",
                   f"--workdir={workdir}", "--mode=collect",
                   *(f"--config.{o}" for o in cli_overrides)]
        print(f"# When they have finished: {shlex.join(collect)}")
        return failed
    if mode in ("sequential", "parallel"):
        if mode == "sequential" and workers is not None:
            workers.end_idle(0)  # Trials train here now: idle workers only hold memory.
        run_batch = run_here if mode == "sequential" else run_in_workers
        if bayes:
            def record():  # sweep.json lists the trials asked so far.
                sweeps.write_sweep_record(workdir, config_path, spec, bayes.trials(),
                                          cli_overrides)

            failed += bayes.run(run_batch, 1 if mode == "sequential" else max_parallel,
                                on_asked=record)
        else:
            failed += run_batch(trials)
    elif mode != "collect":
        raise ValueError(f"--mode={mode!r}; expected sequential, parallel, print or collect")
    outputs = report(plots=True)
    log.info("Sweep report: %s (%d trials failed)", outputs["markdown"], len(failed))
    return failed


def compare_searches(config_path, workdir, search_seeds=3, mode="sequential",
                     max_parallel=2, cli_overrides=(), run_trial=train_in_process,
                     workers=None):
    """Runs the config's sweep space with search="random" and with search="bayes" at its
    num_trials, with search_seed 0 .. search_seeds - 1 each (`W/<search>/search_seed=<s>/`,
    each a resumable sweep), then writes `W/search_comparison.md` and `.png`; returns
    (failed trials as `<search>/search_seed=<s>/<trial>`, write_search_comparison's
    outputs). `mode="collect"` only rewrites the comparison; `workers` as in run_sweep."""
    base = load_sweep(config_path)
    if not base.random or base.num_trials < 2:
        raise ValueError(f"--compare_searches: {config_path}'s sweep needs a `random` "
                         f"space and num_trials >= 2 to compare searches over")
    if base.grid:
        raise ValueError(f"--compare_searches compares searches over one space; "
                         f"{config_path}'s sweep also has grid keys {list(base.grid)}: "
                         f"make them `choice` keys of its random space")
    if mode not in ("sequential", "parallel", "collect"):
        raise ValueError(f"--compare_searches runs with --mode=sequential, parallel or "
                         f"collect, not {mode!r}")
    raw = {k: v for k, v in dataclasses.asdict(base).items() if k != "startup_trials"}
    if base.search == "bayes":  # Its own startup_trials; else bayes's default.
        raw["startup_trials"] = base.startup_trials
    specs = {}
    for search in sweeps.SEARCHES:
        fields = raw if search == "bayes" else {
            k: v for k, v in raw.items() if k != "startup_trials"}
        for seed in range(search_seeds):
            specs[search, seed] = sweeps.parse_sweep(
                {**fields, "search": search, "search_seed": seed})
    failed, curves = [], {}
    for (search, seed), spec in specs.items():
        directory = os.path.join(workdir, search, f"search_seed={seed}")
        log.info("Search comparison: %s search, search_seed=%d", search, seed)
        part_failed = run_sweep(config_path, directory, mode, max_parallel, cli_overrides,
                                run_trial, spec, workers=workers)
        failed += [f"{search}/search_seed={seed}/{name}" for name in part_failed]
        trials = sweeps.sweep_trials(spec, directory)
        groups = sweep_report.group_rows(sweep_report.collect_rows(directory, trials), trials)
        curve = sweep_report.search_curves(groups, spec).get("all", [])
        # Unasked trials (a search cut short) are missing, not the best so far.
        curves.setdefault(search, {})[seed] = (
            curve + [math.nan] * (spec.num_trials - len(curve)))[:spec.num_trials]
    outputs = sweep_report.write_search_comparison(workdir, specs["bayes", 0], curves)
    log.info("Search comparison: %s", outputs["markdown"])
    return failed, outputs


def enable_compilation_cache(workdir):
    """Trials of one sweep compile the same steps again and again (seeds, label
    fractions, learning rates change no shape): JAX's persistent cache in `W/.jax_cache`
    turns the repeats into loads, here and in --mode=parallel's workers (env). A
    size limit turns on eviction, and with it JAX's file lock around every cache read and
    write: parallel trials never read each other's half-written entries."""
    import jax

    cache = os.path.abspath(os.path.join(workdir, ".jax_cache"))
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_compilation_cache_max_size",
                      int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


REPORTS = {"stages": "train.experiments.stages_report"}  # get_ablation's `report` -> its writer.


def load_ablation(config_path, workdir):
    """([Part, ...], report name) of a config defining get_ablation(arg), else None."""
    path, arg = sweeps.split_config_path(config_path)
    module = sweeps.load_config_module(path)
    if not hasattr(module, "get_ablation"):
        return None
    return ablations.parse_ablation(
        module.get_ablation(arg) if arg else module.get_ablation(), workdir)


def run_ablation(config_path, workdir, mode=None, max_parallel=2, cli_overrides=(),
                 run_trial=train_in_process, ablation=None, workers=None):
    """Runs an ablation's parts in order (each a resumable sweep in `workdir/<part>`),
    then writes its report; returns the failed trials as `part/trial`. `ablation`: what
    load_ablation already returned for this config, if the caller has it; `workers` as
    in run_sweep."""
    import importlib

    parts, report = ablation or load_ablation(config_path, workdir)
    # None: each part's own mode (ablations.part_mode); a caller's run_trial runs here.
    chosen = mode if mode or run_trial is train_in_process else "sequential"
    mode = mode or "sequential"
    if report and report not in REPORTS:
        raise ValueError(f"{config_path}: report={report!r}; known: {sorted(REPORTS)}")
    start, failed = time.perf_counter(), []
    for i, part in enumerate(parts):
        log.info("Part %d/%d %s: %s (%.0f s so far)", i + 1, len(parts), part.name,
                 part.title, time.perf_counter() - start)
        part_start = time.perf_counter()
        try:  # Its `{best:...}` overrides, from the earlier parts' results on disk.
            trials = ablations.resolve_trials(workdir, parts, part)
        except ValueError as error:
            if mode in ("sequential", "parallel"):
                raise
            # print: the part's commands wait for the results; collect: report as named.
            log.warning("Part %s: %s", part.name, error)
            if mode == "print":
                print(f"# Part {part.name}: after the parts before it have finished, "
                      f"re-run --mode=print ({error})")
                continue
            trials = None
        try:
            part_failed = run_sweep(part.config, ablations.part_dir(workdir, part),
                                    *ablations.part_mode(part, chosen, max_parallel),
                                    (*part.overrides, *cli_overrides),
                                    run_trial, spec=part.spec, trials=trials,
                                    workers=workers)
        except BaseException:  # SIGTERM, Ctrl-C: the time spent so far still counts.
            if mode != "print":
                ablations.record_part_time(workdir, part, time.perf_counter() - part_start)
            raise
        if mode != "print":
            ablations.record_part_time(workdir, part, time.perf_counter() - part_start,
                                       part_failed)
        failed += [f"{part.name}/{name}" for name in part_failed]
    if report and mode != "print":
        path = importlib.import_module(REPORTS[report]).write_report(workdir, parts)
        log.info("Ablation report: %s (%.0f s)", path, time.perf_counter() - start)
    return failed


def main(argv):
    del argv
    # Our own progress at INFO; libraries (orbax, tfds log through absl) at WARNING.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("strata").setLevel(logging.INFO)
    try:
        f = flags.FLAGS
        enable_compilation_cache(f.workdir)
        ablation = load_ablation(f.config, f.workdir)
        with Workers() as workers:  # Parallel trials' processes, for every part and batch.
            if f.compare_searches:
                failed, _ = compare_searches(f.config, f.workdir, f.compare_searches,
                                             f.mode, f.max_parallel, _cli_overrides,
                                             workers=workers)
            elif ablation:
                # Without --mode, each part runs as it declares (max_parallel).
                failed = run_ablation(f.config, f.workdir,
                                      f.mode if f["mode"].present else None,
                                      f.max_parallel, _cli_overrides, ablation=ablation,
                                      workers=workers)
            else:
                failed = run_sweep(f.config, f.workdir, f.mode, f.max_parallel,
                                   _cli_overrides, workers=workers)
    except (KeyError, ValueError, FileNotFoundError) as error:
        sys.exit(f"FATAL: {error.args[0] if error.args else error}")
    if failed:
        sys.exit(f"{len(failed)} trial(s) failed: {', '.join(failed)}")


def parse_flags(argv):
    """Sets aside `--config.<field>=<value>` (applied to every trial), parses the rest."""
    rest = []
    for arg in argv:
        if arg.startswith("--config."):
            if "=" not in arg:
                sys.exit(f"FATAL: {arg}: write --config.<field>=<value> with '='")
            _cli_overrides.append(arg[len("--config."):])
        else:
            rest.append(arg)
    try:
        return flags.FLAGS(rest)
    except flags.Error as error:
        sys.exit(f"FATAL: {error}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
