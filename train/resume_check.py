"""Resuming a run with another config: which changes keep the checkpoints meaningful.

A workdir's `config.json` records what its checkpoints were computed with. A restart may
change how long the run goes, how often it logs, evaluates and saves, and where it runs
(mesh, attention kernel, multi-host settings): those are allowed and recorded in the
run history. Any other change (model, tokenizer, data, task, objective, optimizer, seed)
would continue the checkpoints under a different computation, so it is refused with a
diff, unless named explicitly (`launch.main --allow_config_change=<field>,...`).

A field the recorded config lacks was added to the code after the run started; new fields
default to the behaviour the code had before them, so they are taken at their current
values (logged and recorded in the run history) instead of refusing every run made by an
older version. A field the code no longer has is still refused.
"""

import fnmatch
import json
import logging

log = logging.getLogger("strata")

# Dotted config fields (fnmatch patterns) a resumed run may change.
SAFE_TO_CHANGE = (
    "train.num_steps", "train.log_every", "train.eval_every", "train.eval_steps",
    "train.final_eval_steps", "train.checkpoint_every", "train.keep_checkpoints",
    "train.progress", "train.report_forgetting", "train.early_stopping_*",
    "mesh.*", "logical_axis_rules", "distributed.*",
    "model.attention_impl", "model.remat",
    "data.data_dir", "data.worker_count", "data.eval_batch_size",
)


class ConfigChangedError(ValueError):
    """A resumed run's config differs from the recorded one in fields that matter."""


def flatten(tree, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}, with tuples as lists (as config.json stores them)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.loads(json.dumps(value, default=str))
    return out


def config_changes(recorded, new):
    """{field: [recorded, new]} for every field whose value differs (missing = None)."""
    a, b = flatten(recorded), flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def is_safe(field, allowed=()):
    return any(fnmatch.fnmatchcase(field, p) for p in (*SAFE_TO_CHANGE, *allowed))


def check_resume(recorded, new, workdir, allowed=()):
    """-> the allowed changes {field: [old, new]}; raises ConfigChangedError naming each
    refused field. `recorded`: the workdir's config.json (None: a new run)."""
    if recorded is None:
        return {}
    changes = config_changes(recorded, new)
    added = sorted(set(flatten(new)) - set(flatten(recorded)))
    if added:
        log.warning("%s: config fields added since this run started, taken at their current "
                    "values: %s", workdir, ", ".join(f"{k}={changes[k][1]!r}" for k in added))
    refused = {k: v for k, v in changes.items() if k not in added and not is_safe(k, allowed)}
    if refused:
        lines = "\n".join(f"  config.{k}: {old!r} (recorded) -> {value!r} (now)"
                          for k, (old, value) in refused.items())
        raise ConfigChangedError(
            f"{workdir} holds a run made with another config; resuming would continue its "
            f"checkpoints under a different computation:\n{lines}\n"
            f"Start a fresh run with another --workdir, or, if you mean it, pass "
            f"--allow_config_change={','.join(refused)} (recorded in "
            f"{workdir}/run_history.jsonl).")
    return changes
