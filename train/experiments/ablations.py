"""Ablations: several sweeps run in order as the parts of one study, and their record.

A config file may define `get_ablation(arg)` (instead of `get_sweep`) returning

    dict(parts=[dict(name="pretrain", config="configs/pretrain_mlm.py:size=tiny",
                     sweep=dict(seeds=[0]), overrides={"train.num_steps": 1200},
                     title="MLM pre-training"),
                dict(name="finetune", config="configs/finetune.py",
                     sweep=dict(grid={"arg.method": ["full", "lora"]}),
                     overrides={"init_from": "{workdir}/pretrain/seed=0"}), ...],
         report="stages")

Each part is a sweep (train/experiments/sweeps.py) run in `<workdir>/<name>/`; parts run in
declaration order, so a later part may start from an earlier part's run:
`{workdir}` in an override value or a config argument is the ablation's workdir (a path
holding a comma would split the argument). `overrides` apply to every
trial of the part (as `--config.<key>=<value>` would). `report` names the report
writer that turns the parts' results into `<workdir>/report.md` (launch/sweep.py).
Config paths are relative to the repository root (the directory holding `configs/`).

An override value `{best:<part>:<field>}` is chosen from an earlier part's results when
this part starts (`resolve_trials`), per trial: `<field>` (e.g. `optim.lr`, read from the
run's config.json) of `<part>`'s trial that scored best on its sweep's metric (mode, mean
over seeds) among those with the same `method=` colon argument as the trial. E.g. a
learning-rate search part, then `"optim.lr": "{best:lr_search:optim.lr}"` trains each
method at its own selected rate. Resolved from the runs on disk, so a resumed ablation
resolves the same values; the trial names do not change, sweep.json records the values.

A part's `max_parallel=N` runs N of its trials at once (`--mode=parallel`'s workers)
when the command names no `--mode`; a `--mode` on the command line applies to every part.
"""

import dataclasses
import json
import os
import re

from train.experiments import sweeps
from train.run_files import atomic_write_json

PART_FIELDS = ("name", "config", "sweep", "overrides", "title", "max_parallel")
BEST = re.compile(r"\{best:([A-Za-z0-9_.-]+):([A-Za-z0-9_.]+)\}")  # {best:<part>:<field>}
MATCH_ARG = "method"  # A selected value is chosen among the source trials of this argument.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Part:
    name: str  # Its directory under the ablation's workdir.
    config: str  # `configs/x.py[:args]`, resolved against the repository root.
    spec: sweeps.SweepSpec
    overrides: tuple  # "key=value" strings for every trial, `{workdir}` substituted.
    title: str
    selected: tuple = ()  # (key, source part, field) of its `{best:...}` overrides.
    # Trials at once (--mode=parallel's workers) when the ablation runs without --mode: a
    # tiny model's trial keeps one core busy, so two fill a 2-core machine.
    max_parallel: int = 1


def parse_ablation(raw, workdir):
    """get_ablation's dict -> ([Part, ...], report name), checked: a bad part fails here,
    naming it, before anything runs."""
    raw = dict(raw)
    unknown = sorted(set(raw) - {"parts", "report"})
    if unknown:
        raise ValueError(f"Unknown ablation field(s) {unknown}; accepted: parts, report")
    parts, names = [], set()
    for i, part in enumerate(raw.get("parts") or ()):
        part = dict(part)
        where = f"Ablation part {i} ({part.get('name', '?')!r})"
        unknown = sorted(set(part) - set(PART_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; accepted: "
                             f"{list(PART_FIELDS)}")
        name = str(part.get("name", ""))
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names:
            raise ValueError(f"{where}: name must be a unique directory-safe word")
        names.add(name)
        if "config" not in part or "sweep" not in part:
            raise ValueError(f"{where}: needs `config` (a config file) and `sweep`")
        # `{workdir}` in a config argument too (a part that starts from an earlier one's
        # run directory, e.g. post_train.py:sft={workdir}/rag_tuned/seed=0).
        path, arg = sweeps.split_config_path(
            str(part["config"]).replace("{workdir}", os.path.abspath(workdir)))
        path = path if os.path.isabs(path) else os.path.join(ROOT, path)
        try:
            spec = sweeps.parse_sweep(part["sweep"])
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error
        clash = sorted(set(dict(part.get("overrides") or {})) & set(spec.keys))
        if clash:
            raise ValueError(f"{where}: override(s) {clash} are also swept; an override "
                             f"would replace every trial's value")
        raw_overrides = dict(part.get("overrides") or {})
        selected = tuple((key, *BEST.fullmatch(value).groups())
                         for key, value in raw_overrides.items()
                         if isinstance(value, str) and BEST.fullmatch(value))
        for key, source, _ in selected:
            if source not in names - {name}:
                raise ValueError(f"{where}: override {key}={raw_overrides[key]!r} names "
                                 f"part {source!r}, which is not declared before it")
        overrides = tuple(
            f"{key}={_format(value).replace('{workdir}', os.path.abspath(workdir))}"
            for key, value in raw_overrides.items()
            if key not in {k for k, _, _ in selected})
        max_parallel = part.get("max_parallel", 1)
        if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) \
                or max_parallel < 1:
            raise ValueError(f"{where}: max_parallel={max_parallel!r}; expected an int >= 1")
        parts.append(Part(name=name, config=f"{path}:{arg}" if arg else path, spec=spec,
                          overrides=overrides, title=str(part.get("title", name)),
                          selected=selected, max_parallel=max_parallel))
    if not parts:
        raise ValueError("The ablation declares no parts")
    return parts, raw.get("report", "")


def _format(value):
    """A Python value as the `--config.` text parse_field_value reads back."""
    return sweeps.command_value(value) if not isinstance(value, str) else value


def part_mode(part, mode, max_parallel):
    """(mode, max_parallel) a part runs with: the command line's when it named a --mode,
    else (mode None) the part's own: parallel with its `max_parallel` when above 1."""
    if mode is not None:
        return mode, max_parallel
    return ("parallel", part.max_parallel) if part.max_parallel > 1 else ("sequential", 1)


def part_dir(workdir, part):
    return os.path.join(workdir, part.name)


def resolve_trials(workdir, parts, part):
    """The part's trials with its `{best:<source>:<field>}` overrides set (see the module
    docstring), or None when it has none. Fails naming the part and method when the
    source has no finished trial of that method, and when a trial that already finished
    ran with another value (the source's results changed since)."""
    if not part.selected:
        return None
    by_name = {p.name: p for p in parts}
    recorded = _recorded_overrides(part_dir(workdir, part))
    trials = []
    for trial in sweeps.enumerate_trials(part.spec):
        overrides = dict(trial.overrides)
        method = _method(part, trial)
        for key, source, field in part.selected:
            if source not in by_name:
                raise ValueError(f"Part {part.name!r}: {key} is selected from part "
                                 f"{source!r}, which this ablation does not run")
            overrides[key] = best_value(workdir, by_name[source], method, field,
                                        where=f"Part {part.name!r} ({key})")
            before = recorded.get(trial.name, {}).get(key, overrides[key])
            if before != overrides[key] and sweeps.is_finished(part_dir(workdir, part), trial):
                raise ValueError(
                    f"Part {part.name!r}: trial {trial.name} finished with {key}={before}, "
                    f"but part {source!r} now selects {overrides[key]} for method "
                    f"{method!r}; delete {part_dir(workdir, part)}/{trial.name} to re-run it")
        trials.append(dataclasses.replace(trial, overrides=overrides))
    return trials


def best_value(workdir, source, method, field, where):
    """`field` of the source part's best group of trials of `method` (its spec's metric
    and mode, mean over seeds; the first in sweep order on a tie)."""
    groups = {}
    for trial in sweeps.enumerate_trials(source.spec):
        if _method(source, trial) == method:
            groups.setdefault(trial.group, []).append(trial)
    directory = part_dir(workdir, source)
    scored = [(value, trials) for trials in groups.values()
              if (value := sweeps.group_value(directory, trials, source.spec.metric))
              is not None]
    if not scored:
        raise ValueError(f"{where}: part {source.name!r} has no finished trial of method "
                         f"{method!r} to select {field} from (in {directory}); run it first")
    sign = 1 if source.spec.mode == "max" else -1
    _, trials = max(scored, key=lambda vt: sign * vt[0])
    with open(os.path.join(directory, trials[0].name, "config.json")) as f:
        node = json.load(f)
    for name in field.split("."):
        node = node[name]
    return node


def _method(part, trial):
    """The trial's `method=` colon argument (its part's config merged with its own)."""
    _, arg = sweeps.split_config_path(sweeps.trial_config_path(part.config, trial))
    args = dict(item.partition("=")[::2] for item in arg.split(",") if item)
    if MATCH_ARG not in args:
        raise ValueError(f"Part {part.name!r}: trial {trial.name} has no `{MATCH_ARG}=` "
                         f"argument to select a `{{best:...}}` value by")
    return args[MATCH_ARG]


def _recorded_overrides(directory):
    """{trial name: overrides} from a part's sweep.json ({} before its first start)."""
    path = os.path.join(directory, "sweep.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {t["name"]: t["overrides"] for t in json.load(f)["trials"]}


def record_part_time(workdir, part, seconds, failed=None):
    """Adds `seconds` to the part's wall time in `<workdir>/ablation.json` (summed over
    resumed invocations, interrupted ones included) and records its failed trials
    (None: an interrupted invocation, which leaves the record's list)."""
    path = os.path.join(workdir, "ablation.json")
    record = read_record(workdir)
    entry = record["parts"].setdefault(part.name, {"wall_s": 0.0, "failed": []})
    entry["wall_s"] += seconds
    if failed is not None:
        entry["failed"] = list(failed)
    entry["title"] = part.title
    atomic_write_json(path, record)


def read_record(workdir):
    path = os.path.join(workdir, "ablation.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"parts": {}}
