"""Sweeps: the trials a config declares, each trial's config, and running them resumably.

A config file may define `get_sweep(arg)` beside `get_config(arg)` (big_vision / t5x
style), returning a dict (or ConfigDict):

    def get_sweep(arg=None):
        return dict(
            grid={"arg.method": ["full", "lora"], "data.label_fraction": [0.1, 1.0]},
            random={"optim.lr": ("loguniform", 1e-4, 1e-2), "train.num_steps":
                    ("int", 500, 2000), "model.dropout": ("choice", [0.0, 0.1])},
            num_trials=4,       # Random draws (crossed with the grid); 0 without `random`.
            seeds=[0, 1, 2],    # Every trial repeated with config.seed = each.
            metric="validation/accuracy", mode="max",
            search="random")    # Or "bayes": optuna's TPE picks each draw from the last.

Sweep keys name what varies: `arg.<name>` is a colon argument of the config file
(`configs/finetune.py:method=lora`), `config_file` swaps the config file itself (a path,
optionally with its own `:args`), and any other key is a dotted config field
(`optim.lr`; a leading `config.` is accepted and dropped). Trials are the cartesian
product of the grid (in declaration order), then the random draws, then the seeds, and
are named from their overrides (`method=lora,label_fraction=0.1,seed=0`): the name is
the trial's directory, so a resumed sweep finds its finished trials however the sweep's
list grew. Random draws come from `numpy.random.default_rng(search_seed)`, are rounded to
4 significant digits (the name is the exact value run) and are distinct.

`search="bayes"` draws the `random` space's `num_trials` points with optuna's TPE sampler
instead (`BayesSearch`, one study per grid point, direction from metric/mode): each draw
is asked after the trials before it were told their metric (the mean over `seeds`), so
they run one after another, or in batches of the worker count in parallel mode (the batch
asked at once, TPE's constant liar keeping its points apart). The first `startup_trials`
draws of a study are random (default: a third of num_trials, between 2 and optuna's 10,
at most num_trials).
The study is a journal file in the sweep directory (`bayes_search.journal`): a killed
search re-run re-runs what was asked but never finished with the same parameters, then
asks only the rest, and a resumed search asks what an uninterrupted one would (each ask
seeded by search_seed and its trial number).
"""

import dataclasses
import difflib
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import re

import ml_collections
import numpy as np

from train.run_files import atomic_write_text
from train.run_record import read_results

log = logging.getLogger("strata")

SPEC_FIELDS = ("grid", "random", "num_trials", "seeds", "metric", "mode", "search_seed",
               "search", "startup_trials")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
SEARCHES = ("random", "bayes")
JOURNAL = "bayes_search.journal"  # The optuna studies of a bayes search, in the sweep dir.
ARG_PREFIX = "arg."
CONFIG_FILE_KEY = "config_file"
_MAX_NAME = 150  # Characters; longer names are cut and end in a hash of the overrides.


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    grid: dict  # Sweep key -> list of values.
    random: dict  # Sweep key -> distribution tuple, e.g. ("loguniform", 1e-4, 1e-2).
    num_trials: int  # Random draws.
    seeds: tuple  # config.seed of each repeat; () keeps the config's own seed.
    metric: str  # "<eval split>/<metric>" in results.json, e.g. "validation/accuracy".
    mode: str  # "max" | "min".
    search_seed: int  # Seeds the random search (and TPE's asks).
    search: str = "random"  # "random" | "bayes" (SEARCHES).
    startup_trials: int = 0  # search="bayes": random draws before TPE models the results.

    @property
    def keys(self):
        return (*self.grid, *self.random)


@dataclasses.dataclass(frozen=True)
class Trial:
    name: str  # Its directory under the sweep's workdir.
    overrides: dict  # Sweep key -> value, grid keys then random keys; never the seed.
    seed: int | None  # config.seed, or None to keep the config's.

    @property
    def group(self):
        """The trial's overrides without its seed: repeats over seeds share a group."""
        return tuple(sorted((k, format_value(v)) for k, v in self.overrides.items()))

    def to_json(self):
        return {"name": self.name, "overrides": self.overrides, "seed": self.seed}


# --- Declaring a sweep --------------------------------------------------------------


def parse_sweep(raw):
    """The dict (or ConfigDict) `get_sweep` returns -> SweepSpec, checked: a bad field,
    key or distribution fails here, naming it."""
    if isinstance(raw, ml_collections.ConfigDict):
        raw = raw.to_dict()
    raw = dict(raw)
    unknown = sorted(set(raw) - set(SPEC_FIELDS))
    if unknown:
        raise ValueError(f"Unknown sweep field(s) {unknown}; accepted: {list(SPEC_FIELDS)}")
    grid = {_sweep_key(k): v for k, v in dict(raw.get("grid") or {}).items()}
    random = {_sweep_key(k): v for k, v in dict(raw.get("random") or {}).items()}
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) \
                or not values:
            raise ValueError(f"Sweep grid[{key!r}]={values!r}: expected a non-empty list "
                             f"of values")
    for key, distribution in random.items():
        _check_distribution(key, distribution)
    both = sorted(set(grid) & set(random))
    if both:
        raise ValueError(f"Sweep key(s) {both} are in both grid and random; keep one")
    if "seed" in grid or "seed" in random:
        raise ValueError("Sweep key 'seed': repeat trials with seeds=[...] instead, so "
                         "results.md averages over them")
    num_trials = int(raw.get("num_trials", 1 if random else 0))
    if random and num_trials < 1:
        raise ValueError(f"Sweep num_trials={num_trials}: random search needs >= 1")
    if num_trials and not random:
        raise ValueError(f"Sweep num_trials={num_trials} without a `random` search space")
    seeds = tuple(int(s) for s in (raw.get("seeds") or ()))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"Sweep seeds={list(seeds)} repeat a seed")
    if not (grid or random or seeds):
        raise ValueError("The sweep declares no grid, random search or seeds: nothing varies")
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise ValueError(f"Sweep mode={mode!r}; expected 'max' or 'min'")
    metric = raw.get("metric", "validation/accuracy")
    if metric.count("/") != 1:
        raise ValueError(f"Sweep metric={metric!r}; expected '<split>/<name>', e.g. "
                         f"'validation/accuracy'")
    search = raw.get("search", "random")
    if search not in SEARCHES:
        raise ValueError(f"Sweep search={search!r}; expected one of {SEARCHES}")
    if search == "bayes" and not random:
        raise ValueError("Sweep search='bayes' without a `random` search space: declare the "
                         "keys TPE searches as random={key: (kind, ...)} and num_trials")
    startup_trials = raw.get("startup_trials")
    if startup_trials is not None and search != "bayes":
        raise ValueError(f"Sweep startup_trials={startup_trials} is for search='bayes'")
    if startup_trials is None:
        startup_trials = (min(num_trials, max(2, min(10, num_trials // 3)))
                          if search == "bayes" else 0)
    if search == "bayes" and not 1 <= int(startup_trials) <= num_trials:
        raise ValueError(f"Sweep startup_trials={startup_trials}: expected 1 to num_trials "
                         f"({num_trials})")
    spec = SweepSpec(grid=grid, random=random, num_trials=num_trials, seeds=seeds,
                     metric=metric, mode=mode, search_seed=int(raw.get("search_seed", 0)),
                     search=search, startup_trials=int(startup_trials))
    if search == "bayes":
        optuna_distributions(spec)  # A space optuna cannot hold fails now, naming the key.
    return spec


def _sweep_key(key):
    key = str(key)
    return key[len("config."):] if key.startswith("config.") else key


def _check_distribution(key, distribution):
    where = f"Sweep random[{key!r}]={distribution!r}"
    if not isinstance(distribution, (list, tuple)) or not distribution \
            or distribution[0] not in DISTRIBUTIONS:
        raise ValueError(f"{where}: expected (kind, ...) with kind one of {DISTRIBUTIONS}, "
                         f"e.g. ('loguniform', 1e-4, 1e-2) or ('choice', [8, 16])")
    kind, *params = distribution
    if kind == "choice":
        if len(params) != 1 or not isinstance(params[0], (list, tuple)) or not params[0]:
            raise ValueError(f"{where}: expected ('choice', [value, ...])")
        return
    if len(params) != 2:
        raise ValueError(f"{where}: expected ({kind!r}, low, high)")
    low, high = params
    if kind == "int" and not all(isinstance(p, int) for p in params):
        raise ValueError(f"{where}: int bounds must be integers (both inclusive)")
    if not low < high:
        raise ValueError(f"{where}: low must be below high")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{where}: loguniform needs 0 < low")


# --- Enumerating trials ----------------------------------------------------------------


def grid_points(spec):
    """The grid's points {key: value}, in declaration order ([{}] without a grid)."""
    return [dict(zip(spec.grid, values)) for values in itertools.product(*spec.grid.values())]


def enumerate_trials(spec):
    """Every trial of `spec`, deterministically: grid x random draws x seeds. A bayes
    search's trials exist only as it runs: `sweep_trials` reads them from its journal."""
    if spec.search == "bayes":
        raise ValueError("Sweep search='bayes': its trials are asked as it runs; "
                         "sweep_trials(spec, workdir) lists those asked so far")
    draws = random_draws(spec) if spec.random else [{}]
    seeds = spec.seeds or (None,)
    short = short_names(spec.keys)
    trials, names = [], {}
    for point, draw, seed in itertools.product(grid_points(spec), draws, seeds):
        overrides = {**point, **draw}
        name = trial_name(overrides, seed, short)
        if name in names:
            raise ValueError(f"Trials {names[name]} and {overrides} (seed {seed}) have the "
                             f"same name {name!r}; make their values differ in the first "
                             f"4 significant digits or in their printable characters")
        names[name] = overrides
        trials.append(Trial(name=name, overrides=overrides, seed=seed))
    return trials


def random_draws(spec):
    """`spec.num_trials` distinct draws {key: value} from `spec.random`, by search_seed."""
    rng = np.random.default_rng(spec.search_seed)
    draws, seen = [], set()
    for _ in range(100 * spec.num_trials):
        draw = {key: _sample(rng, dist) for key, dist in spec.random.items()}
        identity = repr(sorted((k, format_value(v)) for k, v in draw.items()))
        if identity not in seen:
            seen.add(identity)
            draws.append(draw)
            if len(draws) == spec.num_trials:
                return draws
    raise ValueError(f"Sweep random={spec.random} has fewer than num_trials="
                     f"{spec.num_trials} distinct points (found {len(draws)})")


def _sample(rng, distribution):
    kind, *params = distribution
    if kind == "choice":
        return params[0][int(rng.integers(len(params[0])))]
    if kind == "int":
        return int(rng.integers(params[0], params[1] + 1))
    low, high = float(params[0]), float(params[1])
    if kind == "loguniform":
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    return _round_draw(value, low, high)


def _round_draw(value, low, high):
    """4 significant digits (a trial's name is the exact value it ran), kept inside
    [low, high] (rounding may step just outside)."""
    return min(max(float(f"{float(value):.4g}"), float(low)), float(high))


def short_names(keys):
    """Sweep key -> the name shown in trial names and tables: the last dotted component
    (`optim.lr` -> `lr`), or the whole key where two keys would share it."""
    last = {k: k.split(".")[-1] for k in keys}
    counts = {}
    for name in last.values():
        counts[name] = counts.get(name, 0) + 1
    return {k: (name if counts[name] == 1 else k) for k, name in last.items()}


def trial_name(overrides, seed, short=None):
    """`method=lora,lr=0.001,seed=0`, safe as a directory name."""
    short = short or short_names(overrides)
    parts = [f"{short[k]}={format_value(v)}" for k, v in overrides.items()]
    if seed is not None:
        parts.append(f"seed={seed}")
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))
    if len(name) > _MAX_NAME:  # Filesystems cap names at 255 bytes.
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:_MAX_NAME - 11]}-{digest}"
    return name


def format_value(value):
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "none"
    return str(value)


def probe_trials(spec):
    """Trials that reach every declared value of a bayes search before it asks any: each
    grid point with each choice and each bound of the ranges (as few trials as the
    longest choice list, at least 2), so a key or value the config rejects fails up front.
    """
    count = max([2] + [len(d[1]) for d in spec.random.values() if d[0] == "choice"])
    short = short_names(spec.keys)
    seed = spec.seeds[0] if spec.seeds else None
    trials = []
    for point in grid_points(spec):
        for i in range(count):
            draw = {key: (params[0][i % len(params[0])] if kind == "choice"
                          else params[i % 2]) for key, (kind, *params) in spec.random.items()}
            overrides = {**point, **draw}
            trials.append(Trial(trial_name(overrides, seed, short), overrides, seed))
    return trials


# --- A trial's config -----------------------------------------------------------------


def load_config_module(path):
    """The Python module of a config file path (`configs/finetune.py`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} not found")
    name = "strata_config_" + re.sub(r"\W", "_", os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_config_path(config_path):
    """`configs/finetune.py:method=lora` -> ("configs/finetune.py", "method=lora")."""
    path, _, arg = config_path.partition(":")
    return path, arg


def trial_config_path(config_path, trial):
    """The `--config` of a trial: the file (or its `config_file` override) with the
    trial's `arg.` overrides merged into the colon arguments (a trial's value wins)."""
    if CONFIG_FILE_KEY in trial.overrides:
        config_path = str(trial.overrides[CONFIG_FILE_KEY])
    path, arg = split_config_path(config_path)
    items = {}
    for item in filter(None, arg.split(",")):
        key, equals, value = item.partition("=")
        items[key.strip()] = value if equals else None  # None: a bare flag word.
    for key, value in trial.overrides.items():
        if key.startswith(ARG_PREFIX):
            items[key[len(ARG_PREFIX):]] = _format_arg(value)
    merged = ",".join(k if v is None else f"{k}={v}" for k, v in items.items())
    return f"{path}:{merged}" if merged else path


def _format_arg(value):
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if "," in text or ":" in text:
        raise ValueError(f"Colon argument value {value!r} contains ',' or ':'")
    return text


def field_overrides(trial):
    """The trial's dotted config field overrides (its seed included), in order."""
    fields = {k: v for k, v in trial.overrides.items()
              if not k.startswith(ARG_PREFIX) and k != CONFIG_FILE_KEY}
    if trial.seed is not None:
        fields["seed"] = trial.seed
    return fields


def build_config(config_path, overrides=(), cli_overrides=()):
    """get_config(arg) of `config_path` with `overrides` (dotted key -> value) applied,
    then `cli_overrides` ("key=value" strings, as after `--config.`)."""
    path, arg = split_config_path(config_path)
    module = load_config_module(path)
    config = module.get_config(arg) if arg else module.get_config()
    for key, value in dict(overrides).items():
        set_field(config, key, value)
    for item in cli_overrides:
        key, _, text = item.partition("=")
        set_field(config, key, parse_field_value(config, key, text))
    return config


def trial_config(config_path, trial, cli_overrides=()):
    """The trial's full config; a sweep key the config does not have fails naming it."""
    try:
        return build_config(trial_config_path(config_path, trial), field_overrides(trial),
                            cli_overrides)
    except (KeyError, AttributeError, TypeError, ValueError) as error:
        detail = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise ValueError(f"Trial {trial.name}: {detail}") from error


def _parent(config, key):
    """(the ConfigDict holding `key`, its last component); a missing field fails naming it."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f"; did you mean {'.'.join(parts[:i] + close)!r}?" if close else ""
            raise KeyError(f"Sweep key {key!r}: the config has no field "
                           f"{'.'.join(parts[:i + 1])!r}{hint}")
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def set_field(config, key, value):
    """config.<key> = value, with the field's type checked (ConfigDict's own check)."""
    parent, leaf = _parent(config, key)
    if isinstance(parent[leaf], tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        setattr(parent, leaf, value)
    except TypeError as error:
        raise TypeError(f"Sweep key {key!r}={value!r}: {error}") from error


def parse_field_value(config, key, text):
    """A command-line string -> the field's type (as ml_collections' config_flags does)."""
    import ast

    parent, leaf = _parent(config, key)
    current = parent[leaf]
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--config.{key}={text!r}: expected true or false")
        return text.lower() in ("true", "1")
    if isinstance(current, (int, float)):
        return type(current)(text)
    if isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text


def command_value(value):
    """A Python value as `--config.key=` text that config_flags parses back to it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (float, tuple, list)):
        return repr(value)
    return str(value)


def trial_command(config_path, trial, workdir, cli_overrides=(), python="python"):
    """The `launch.main` command line that runs `trial` in `workdir/<name>`."""
    fields = [f"--config.{k}={command_value(v)}" for k, v in field_overrides(trial).items()]
    return [python, "-m", "launch.main", f"--config={trial_config_path(config_path, trial)}",
            f"--workdir={os.path.join(workdir, trial.name)}", *fields,
            *(f"--config.{o}" for o in cli_overrides)]


# --- Running and resuming ---------------------------------------------------------------


def is_finished(workdir, trial):
    """True when the trial's results.json is complete (a JSON object): the last file a run
    writes. An empty or half-written one (a killed copy, a full disk) runs the trial again;
    `read_results` logs which."""
    return read_results(os.path.join(workdir, trial.name, "results.json")) is not None


def write_sweep_record(workdir, config_path, spec, trials, cli_overrides=()):
    """`sweep.json`: what the sweep is, written before any trial runs."""
    os.makedirs(workdir, exist_ok=True)
    record = {"config": config_path, "cli_overrides": list(cli_overrides),
              "spec": dataclasses.asdict(spec),
              "trials": [t.to_json() for t in trials]}
    atomic_write_text(os.path.join(workdir, "sweep.json"),
                      json.dumps(record, indent=2, default=repr))


def run_trials(workdir, trials, run_trial, on_done=None):
    """Runs `run_trial(trial)` for each trial without results.json, in order, then
    `on_done(failed)`; returns the names of the trials that raised.

    A trial that raises is logged and the rest go on. A killed sweep re-run skips what
    finished; a half-run trial's own checkpoints resume it (train_and_evaluate resumes
    from its workdir).
    """
    failed = []
    for i, trial in enumerate(trials):
        if is_finished(workdir, trial):
            log.info("Trial %d/%d %s: finished, skipped", i + 1, len(trials), trial.name)
            continue
        log.info("Trial %d/%d %s", i + 1, len(trials), trial.name)
        try:
            run_trial(trial)
        except Exception:  # One bad trial (e.g. a diverging lr) must not end the sweep.
            log.exception("Trial %s failed", trial.name)
            failed.append(trial.name)
        if on_done is not None:
            on_done(failed)
    return failed


def split_name(split):
    """`validation[:512]` -> `validation`: a sliced split (tfds syntax) reports under its
    split's name."""
    return re.sub(r"\[[^\]]*\]$", "", split)


def group_value(workdir, trials, metric):
    """The mean of `metric` ("<split>/<name>") over `trials` (one group's seeds), or None
    while any of them has no complete results.json or a non-finite value."""
    split, name = metric.split("/")
    values = []
    for trial in trials:
        results = read_results(os.path.join(workdir, trial.name, "results.json"))
        if results is None:
            return None
        scores = {split_name(k): v for k, v in results.items() if isinstance(v, dict)}
        value = scores.get(split, {}).get(name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        values.append(float(value))
    return float(np.mean(values))


def sweep_trials(spec, workdir):
    """The trials of a sweep: all of them (grid x random draws x seeds), or for a bayes
    search those its journal in `workdir` holds so far, in the order they were asked."""
    if spec.search == "bayes":
        return BayesSearch(workdir, spec).trials()
    return enumerate_trials(spec)


# --- Bayesian search (optuna's TPE) -------------------------------------------------------


def optuna_distributions(spec):
    """spec.random -> {sweep key: optuna distribution}: uniform -> FloatDistribution,
    loguniform -> FloatDistribution(log=True), int -> IntDistribution (both bounds
    inclusive), choice -> CategoricalDistribution. Choices optuna cannot store (it takes
    None, bool, int, float and str) fail naming the key."""
    from optuna import distributions as od

    space = {}
    for key, (kind, *params) in spec.random.items():
        if kind == "choice":
            choices = list(params[0])
            bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float,
                                                                               str))]
            if bad:
                raise ValueError(
                    f"Sweep random[{key!r}]=('choice', {choices!r}): search='bayes' keeps its "
                    f"draws in optuna, which stores None, bool, int, float or str choices, not "
                    f"{type(bad[0]).__name__} {bad[0]!r}; choose through a colon argument "
                    f"(arg.<name>) naming each value, or use search='random'")
            if len(set(map(repr, choices))) != len(choices):
                raise ValueError(f"Sweep random[{key!r}]=('choice', {choices!r}) repeats a "
                                 f"choice")
            space[key] = od.CategoricalDistribution(choices)
        elif kind == "int":
            space[key] = od.IntDistribution(int(params[0]), int(params[1]))
        else:
            space[key] = od.FloatDistribution(float(params[0]), float(params[1]),
                                              log=kind == "loguniform")
    return space


@dataclasses.dataclass
class _Group:
    """One parameter set of a study: its trials (one a seed) and the optuna trial numbers
    asked for it (more than one when TPE proposed it again: a duplicate ask)."""
    trials: list
    numbers: list


class BayesSearch:
    """The TPE search of a sweep with search="bayes": one optuna study per grid point
    (named after it) in `workdir/bayes_search.journal`, asked and told through
    `study.ask` / `study.tell`.

    A trial is one asked parameter set (rounded as random draws are: names are the values
    run) crossed with the sweep's seeds; it is told the mean of the sweep's metric over
    them, or failed while a seed has no result. A rounded set equal to an earlier one is
    not run again: that ask is told the earlier value and asked anew. Resuming, every
    asked set's unfinished trials run again with its parameters before anything new is
    asked; a failed set is retried once per run and, when it then finishes, added to the
    study with its value.
    """

    def __init__(self, workdir, spec):
        self.workdir, self.spec = workdir, spec
        self.path = os.path.join(workdir, JOURNAL)
        self.distributions = optuna_distributions(spec)
        self.short = short_names(spec.keys)
        self._storage = None

    def storage(self):
        import optuna

        if self._storage is None:
            os.makedirs(self.workdir, exist_ok=True)
            _drop_torn_line(self.path)
            self._storage = optuna.storages.JournalStorage(
                optuna.storages.journal.JournalFileBackend(self.path))
        return self._storage

    def study(self, point, create=False):
        """The study of grid point `point`, checked against the spec it was created with;
        None when it does not exist and `create` is False."""
        import optuna

        name = trial_name(point, None, self.short) or "search"
        record = json.dumps({"random": self.spec.random, "metric": self.spec.metric,
                             "mode": self.spec.mode}, sort_keys=True, default=repr)
        if not create and not (os.path.exists(self.path)
                               and name in optuna.get_all_study_names(self.storage())):
            return None
        study = optuna.create_study(
            storage=self.storage(), study_name=name, load_if_exists=True,
            direction="maximize" if self.spec.mode == "max" else "minimize")
        kept = study.user_attrs.get("sweep")
        if kept is None:
            study.set_user_attr("sweep", record)
        elif kept != record:
            raise ValueError(f"{self.path}: study {name!r} searched {kept}, but the sweep now "
                             f"declares {record}; resume with the declaration it ran with, "
                             f"or start a new sweep directory")
        return study

    def trials(self):
        """The trials asked so far, grid point after grid point, each in ask order."""
        trials = []
        for point in grid_points(self.spec):
            study = self.study(point)
            if study is not None:
                groups = self._groups(study, point)
                trials += [t for g in groups[:self.spec.num_trials] for t in g.trials]
        return trials

    def _trials_of(self, point, params):
        draw = {}
        for key, (kind, *bounds) in self.spec.random.items():
            value = params[key]
            draw[key] = (int(value) if kind == "int" else value if kind == "choice"
                         else _round_draw(value, *bounds))
        overrides = {**point, **draw}
        return [Trial(trial_name(overrides, seed, self.short), overrides, seed)
                for seed in self.spec.seeds or (None,)]

    def _groups(self, study, point, repair=False):
        """[_Group] in the order first asked. An ask killed before all its parameters
        were stored never became a trial; `repair` (the search's own process) fails it."""
        from optuna.trial import TrialState

        groups = {}
        for frozen in study.get_trials(deepcopy=False):
            if set(frozen.params) != set(self.spec.random):
                if repair and frozen.state == TrialState.RUNNING:
                    study.tell(frozen.number, state=TrialState.FAIL)
                continue
            trials = self._trials_of(point, frozen.params)
            group = groups.setdefault(trials[0].group, _Group(trials, []))
            group.numbers.append(frozen.number)
        return list(groups.values())

    def _sampler(self, number):
        import optuna

        # Seeded by search_seed and the trial number: a resumed search asks what an
        # uninterrupted one would have, given the same results.
        seed = int(np.random.SeedSequence([self.spec.search_seed, number])
                   .generate_state(1)[0])
        # Multivariate TPE (the parameters' joint density, optuna 5's default); the
        # constant liar keeps a batch's asks apart (parallel mode).
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.spec.startup_trials,
                                          multivariate=True, constant_liar=True)

    def _ask(self, study, point, groups):
        """A new parameter set (appended to `groups`); a duplicate ask is told the
        earlier set's value (failed while it has none) and asked again."""
        import optuna

        for _ in range(100 * self.spec.num_trials):
            number = len(study.get_trials(deepcopy=False))
            study.sampler = self._sampler(number)
            asked = study.ask(self.distributions)
            trials = self._trials_of(point, asked.params)
            same = [g for g in groups if g.trials[0].group == trials[0].group]
            if not same:
                groups.append(_Group(trials, [asked.number]))
                return groups[-1]
            # Told what the earlier set measured, so TPE's model holds it twice, as if
            # run twice; failed while it has not finished (the same batch).
            value = group_value(self.workdir, same[0].trials, self.spec.metric)
            if value is None:
                study.tell(asked, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(asked, value)
        raise ValueError(f"Sweep random={self.spec.random}: TPE found fewer than num_trials="
                         f"{self.spec.num_trials} distinct points (found {len(groups)})")

    def _tell(self, study, group):
        """Tells every still-running ask of `group` its value (or fails it); a set told
        failed earlier whose trials have now finished is added with its value."""
        import optuna
        from optuna.trial import TrialState

        value = group_value(self.workdir, group.trials, self.spec.metric)
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        asked = [by_number[n] for n in group.numbers]
        running = [t for t in asked if t.state == TrialState.RUNNING]
        for frozen in running:
            if value is None:
                study.tell(frozen.number, state=TrialState.FAIL)
            else:
                study.tell(frozen.number, value)
        if value is not None and not running and all(
                t.state != TrialState.COMPLETE for t in asked):
            first = asked[0]
            study.add_trial(optuna.trial.create_trial(
                params=first.params, distributions=first.distributions, value=value))
            group.numbers.append(len(by_number))

    def run(self, run_batch, batch_size=1, on_asked=None):
        """Runs the search; returns the names of the trials that failed.

        `run_batch(trials)` runs those of `trials` without results.json (in order, or
        `batch_size` parameter sets at once) and returns the names that failed;
        `on_asked()` is called after each new ask (the caller rewrites sweep.json)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # Ours say what it does.
        failed = []

        def run_groups(groups):
            failed.extend(run_batch([t for g in groups for t in g.trials]))
            for group in groups:
                self._tell(study, group)

        for point in grid_points(self.spec):
            study = self.study(point, create=True)
            groups = self._groups(study, point, repair=True)[:self.spec.num_trials]
            # Resuming: what was asked and not finished runs again, with its parameters.
            unfinished = [g for g in groups if not all(
                is_finished(self.workdir, t) for t in g.trials)]
            for group in groups:
                if group not in unfinished:
                    self._tell(study, group)  # Killed between its last trial and tell.
            if unfinished:
                log.info("Bayes search (study %r): %d asked trial(s) to finish",
                         study.study_name, len(unfinished))
            for start in range(0, len(unfinished), batch_size):
                run_groups(unfinished[start:start + batch_size])
            while len(groups) < self.spec.num_trials:
                size = min(batch_size, self.spec.num_trials - len(groups))
                batch = [self._ask(study, point, groups) for _ in range(size)]
                log.info("Bayes search (study %r): asked %d/%d", study.study_name,
                         len(groups), self.spec.num_trials)
                if on_asked is not None:
                    on_asked()
                run_groups(batch)
        return failed


def _drop_torn_line(path):
    """Cuts a journal's last line when a kill left it half-written: optuna reads past it
    but would append after it, corrupting the next line. What it recorded is redone (an
    ask asks again, a trial's tell is told again from its results.json)."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropped a half-written last line (%d bytes)", path, len(data) - keep)
        f.truncate(keep)
