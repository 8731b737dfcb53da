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
            metric="validation/accuracy", mode="max")

Sweep keys name what varies: `arg.<name>` is a colon argument of the config file
(`configs/finetune.py:method=lora`), `config_file` swaps the config file itself (a path,
optionally with its own `:args`), and any other key is a dotted config field
(`optim.lr`; a leading `config.` is accepted and dropped). Trials are the cartesian
product of the grid (in declaration order), then the random draws, then the seeds, and
are named from their overrides (`method=lora,label_fraction=0.1,seed=0`): the name is
the trial's directory, so a resumed sweep finds its finished trials however the sweep's
list grew. Random draws come from `numpy.random.default_rng(search_seed)`, are rounded to
4 significant digits (the name is the exact value run) and are distinct.
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

SPEC_FIELDS = ("grid", "random", "num_trials", "seeds", "metric", "mode", "search_seed")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
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
    search_seed: int  # Seeds the random search.

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
    return SweepSpec(grid=grid, random=random, num_trials=num_trials, seeds=seeds,
                     metric=metric, mode=mode, search_seed=int(raw.get("search_seed", 0)))


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


def enumerate_trials(spec):
    """Every trial of `spec`, deterministically: grid x random draws x seeds."""
    grid_points = [dict(zip(spec.grid, values))
                   for values in itertools.product(*spec.grid.values())]
    draws = random_draws(spec) if spec.random else [{}]
    seeds = spec.seeds or (None,)
    short = short_names(spec.keys)
    trials, names = [], {}
    for point, draw, seed in itertools.product(grid_points, draws, seeds):
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
    # 4 significant digits, kept inside [low, high] (rounding may step just outside).
    return min(max(float(f"{value:.4g}"), low), high)


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
