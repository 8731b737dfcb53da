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
`{workdir}` in an override value is the ablation's workdir. `overrides` apply to every
trial of the part (as `--config.<key>=<value>` would). `report` names the report
writer that turns the parts' results into `<workdir>/report.md` (launch/sweep.py).
Config paths are relative to the repository root (the directory holding `configs/`).
"""

import dataclasses
import json
import os
import re

from train.experiments import sweeps

PART_FIELDS = ("name", "config", "sweep", "overrides", "title")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Part:
    name: str  # Its directory under the ablation's workdir.
    config: str  # `configs/x.py[:args]`, resolved against the repository root.
    spec: sweeps.SweepSpec
    overrides: tuple  # "key=value" strings for every trial, `{workdir}` substituted.
    title: str


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
        path, arg = sweeps.split_config_path(part["config"])
        path = path if os.path.isabs(path) else os.path.join(ROOT, path)
        try:
            spec = sweeps.parse_sweep(part["sweep"])
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error
        clash = sorted(set(dict(part.get("overrides") or {})) & set(spec.keys))
        if clash:
            raise ValueError(f"{where}: override(s) {clash} are also swept; an override "
                             f"would replace every trial's value")
        overrides = tuple(
            f"{key}={_format(value).replace('{workdir}', os.path.abspath(workdir))}"
            for key, value in dict(part.get("overrides") or {}).items())
        parts.append(Part(name=name, config=f"{path}:{arg}" if arg else path, spec=spec,
                          overrides=overrides, title=str(part.get("title", name))))
    if not parts:
        raise ValueError("The ablation declares no parts")
    return parts, raw.get("report", "")


def _format(value):
    """A Python value as the `--config.` text parse_field_value reads back."""
    return sweeps.command_value(value) if not isinstance(value, str) else value


def part_dir(workdir, part):
    return os.path.join(workdir, part.name)


def record_part_time(workdir, part, seconds, failed):
    """Adds `seconds` to the part's wall time in `<workdir>/ablation.json` (summed over
    resumed invocations) and records its failed trials."""
    path = os.path.join(workdir, "ablation.json")
    record = read_record(workdir)
    entry = record["parts"].setdefault(part.name, {"wall_s": 0.0})
    entry["wall_s"] += seconds
    entry["failed"] = list(failed)
    entry["title"] = part.title
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)


def read_record(workdir):
    path = os.path.join(workdir, "ablation.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"parts": {}}
