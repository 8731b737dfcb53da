"""Entry point for every stage: `python -m launch.main --config configs/X.py --workdir W`.

Any config field is overridable (`--config.optim.lr=3e-4`); config files take
big_vision-style arguments after a colon (`configs/scratch.py:runlocal,size=base`).
`--dry_run` builds the model abstractly, writes `W/params.json` and exits.
`--compile_only [--topology=cpu:8|tpu:v5e:4x4]` compiles the train step for the mesh
without allocating it, writes `W/compile.json` (per-device memory, compile time), exits.
Both describe the step the task's run trains with (GRPO's and DPO's own update step).
Multi-host: every process runs this same command (train/distributed.py connects them).

A run owns its workdir (`W/.lock`): a second run on it fails at once, naming the first.
Re-running the same command resumes; a restart whose config changes more than steps,
cadence, mesh or attention kernel is refused with a diff (`--allow_config_change=` names
fields to allow). Exit status 75 (EX_TEMPFAIL): preempted (SIGTERM) after saving a
checkpoint; requeue the same command to resume.
"""

import json
import logging
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if present).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Count parameters abstractly and exit.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile the train step ahead of time, report its memory, exit.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", "", "With --compile_only: '' (these devices), cpu:N or tpu:<name>.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_string(
    "allow_config_change", "", "Comma-separated config fields a restart in an existing "
    "workdir may change beyond the safe ones (train/resume_check.py), e.g. optim.lr.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from train.config_checks import validate

    # Our own progress at INFO; libraries (orbax, tfds log through absl) at WARNING.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("strata").setLevel(logging.INFO)
    from train.run_record import check_workdir

    config = _CONFIG.value
    validate(config)
    check_workdir(_WORKDIR.value)
    if _TOPOLOGY.value.startswith("cpu:") and "xla_force_host_platform_device_count" not in \
            os.environ.get("XLA_FLAGS", ""):  # N fake CPU devices; read at backend start.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                                   f"platform_device_count={_TOPOLOGY.value[4:]}").strip()
        jax.config.update("jax_platforms", "cpu")
    from train import distributed

    distributed.initialize(config.get("distributed"))  # Before anything touches a device.
    if jax.process_index() != 0:  # One process speaks for all.
        logging.getLogger("strata").setLevel(logging.WARNING)
    if config.prng_impl:
        jax.config.update("jax_default_prng_impl", config.prng_impl)
    from train import loop

    if _DRY_RUN.value:
        counts = loop.dry_run(config, _WORKDIR.value)
        print(json.dumps(counts, indent=2))
        return
    if _COMPILE_ONLY.value:
        from train import aot

        print(json.dumps(aot.compile_only(config, _WORKDIR.value, _TOPOLOGY.value), indent=2))
        return
    from launch import run_task

    results = run_task.run(config, _WORKDIR.value,
                           tuple(filter(None, _ALLOW_CONFIG_CHANGE.value.split(","))))
    print(json.dumps(results, indent=2, default=str))
    if "preempted_at_step" in results:  # Saved; tell the scheduler to requeue.
        sys.exit(run_task.PREEMPTED_EXIT_CODE)


def parse_flags(argv):
    """Flag errors as one actionable line (the key, what was wrong) instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as error:
        # ml_collections raises KeyError/AttributeError for unknown config keys.
        detail = str(error.args[0] if error.args else error).replace("\\n", " ")
        detail = " ".join(detail.replace("\\", "").replace("'", "").split())
        if "Error whilst parsing config file" in detail:  # The config file's own error.
            config = next((a for a in argv if a.startswith("--config=")), "--config")
            sys.exit(f"FATAL: {config}: {detail.rsplit('Error: ', 1)[-1]}")
        overrides = [a for a in argv if a.startswith("--config.")]
        sys.exit(f"FATAL: bad config override among {overrides}: {detail}")


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
