"""Multi-controller start-up: one process per host (TPU) or per GPU, all running the same
program; `jax.distributed.initialize` connects them before anything touches a device.

Where the settings come from, first match wins:
1. `config.distributed` fields that are set (`coordinator_address`, `num_processes`,
   `process_id`, `local_device_ids`), then the `STRATA_COORDINATOR`,
   `STRATA_NUM_PROCESSES`, `STRATA_PROCESS_ID`, `STRATA_LOCAL_DEVICE_IDS` environment
   variables: an explicit `jax.distributed.initialize(...)`;
2. a cluster JAX detects itself — a Cloud TPU VM, or a SLURM job step of more than one
   task (`srun`) — `jax.distributed.initialize()` with no arguments;
3. otherwise nothing: a single-process run (a laptop, one GPU host, a test).

`config.distributed.mode` overrides the detection: "auto" (the above), "jax" (always
call `jax.distributed.initialize()` with no arguments) or "off" (never).
"""

import logging
import os

import jax

log = logging.getLogger("strata")

MODES = ("auto", "jax", "off")
# config.distributed field -> environment variable, used where the field is unset.
ENV = {
    "coordinator_address": "STRATA_COORDINATOR",
    "num_processes": "STRATA_NUM_PROCESSES",
    "process_id": "STRATA_PROCESS_ID",
    "local_device_ids": "STRATA_LOCAL_DEVICE_IDS",
}


def explicit_settings(dist_cfg, environ=None):
    """The keyword arguments for `jax.distributed.initialize`, {} if none are given.

    Empty strings and -1 mean unset; `local_device_ids` is "0,1,2,3" or a sequence.
    """
    environ = os.environ if environ is None else environ
    settings = {}
    for key, var in ENV.items():
        value = dist_cfg.get(key, None) if dist_cfg is not None else None
        if value in (None, "", -1, ()):
            value = environ.get(var, "")
        if value in ("", None):
            continue
        if key in ("num_processes", "process_id"):
            value = int(value)
        elif key == "local_device_ids":
            value = [int(i) for i in (value.split(",") if isinstance(value, str) else value)]
        settings[key] = value
    if settings and not {"coordinator_address", "num_processes", "process_id"} <= set(settings):
        missing = sorted({"coordinator_address", "num_processes", "process_id"} - set(settings))
        raise ValueError(
            f"Multi-process settings are partial: {sorted(settings)} set but {missing} not "
            f"(config.distributed.<name> or {', '.join(ENV[m] for m in missing)})")
    return settings


def detected_cluster(environ=None):
    """"slurm", "cloud_tpu" or None: a multi-process environment JAX configures itself."""
    environ = os.environ if environ is None else environ
    tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or "1"
    if "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ and int(tasks) > 1:
        return "slurm"
    if environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":  # TPUs unused here.
        return None
    try:  # Cheap (no network): looks for TPU chips on this VM.
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except ImportError:  # A jax without it: rely on config.distributed.mode="jax".
        running_in_cloud_tpu_vm = False
    return "cloud_tpu" if running_in_cloud_tpu_vm else None


def use_cpu_collectives():
    """Cross-process collectives on CPU devices need gloo (the CPU client has none by
    default); the setting touches only the CPU backend, so GPU and TPU runs are unchanged."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(dist_cfg, environ=None):
    """Connects this process to the others; returns how: "explicit", "auto" or "single".

    Must run before anything touches a device (`jax.devices()`, creating an array).
    """
    mode = dist_cfg.get("mode", "auto") if dist_cfg is not None else "auto"
    if mode not in MODES:
        raise ValueError(f"config.distributed.mode={mode!r}; expected one of {MODES}")
    if mode == "off":
        return "single"
    settings = explicit_settings(dist_cfg, environ)
    if settings.get("num_processes") == 1:
        return "single"
    if settings:
        use_cpu_collectives()
        jax.distributed.initialize(**settings)
        how = "explicit"
    elif mode == "jax" or detected_cluster(environ):
        use_cpu_collectives()
        jax.distributed.initialize()
        how = "auto"
    else:
        return "single"
    log.info("Process %d of %d (%s initialisation), %d local devices",
             jax.process_index(), jax.process_count(), how, jax.local_device_count())
    return how
