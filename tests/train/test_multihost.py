"""Multi-host for real on CPU: two processes x 4 fake devices (localhost coordinator, gloo
collectives) train together and match one process with 8 devices step for step; their
checkpoints resume in one process, and one process's in two."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from configs import scratch
from train import distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, HALF = 6, 3
# The same run in every process count: no dropout (its masks follow rows, and rows sit
# on other devices in a 2-process batch), fsdp across the two processes' devices.
OVERRIDES = {"train.num_steps": STEPS, "train.log_every": 1, "train.eval_every": 100,
             "train.checkpoint_every": HALF, "train.eval_steps": 1, "train.final_eval_steps": 1,
             "train.progress": False,
             "model.dropout": 0.0, "model.attention_dropout": 0.0,
             "mesh.data": 2, "mesh.fsdp": 4}
RTOL = 1e-5


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(workdir, data_dir, count, cache_dir, timeout=300):
    """`python -m launch.main` as processes 0..count-1 of `count`, with 8 CPU devices in
    all. A shared compilation cache: each process count compiles its steps once."""
    port = free_port()
    args = [sys.executable, "-m", "launch.main", "--config=configs/scratch.py:runlocal",
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
    processes = []
    for index in range(count):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               # -O0: these tiny steps compile several times faster (all runs alike).
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // count} "
                            "--xla_backend_optimization_level=0",
               "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        if count > 1:
            env.update(STRATA_COORDINATOR=f"localhost:{port}",
                       STRATA_NUM_PROCESSES=str(count), STRATA_PROCESS_ID=str(index))
        log = open(f"{workdir}.{index}.log", "w")
        processes.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=timeout) for p in processes]
    finally:
        for p in processes:  # One failing leaves the others waiting at a barrier.
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [open(f"{workdir}.{i}.log").read() for i in range(count)]
    assert codes == [0] * count, "\n\n".join(log[-3000:] for log in logs)
    return logs


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["train/loss"] for r in map(json.loads, f)}


def rewind(source, target, step):
    """A copy of run `source` as if it had stopped at `step` (its later checkpoints,
    best checkpoint and metrics gone)."""
    shutil.copytree(source, target)
    for name in os.listdir(os.path.join(target, "checkpoints")):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(target, "checkpoints", name))
    shutil.rmtree(os.path.join(target, "best"))
    os.remove(os.path.join(target, "metrics.jsonl"))


def assert_close(got, want, steps):
    assert sorted(got) == list(steps), got
    for step in steps:
        assert abs(got[step] - want[step]) <= RTOL * abs(want[step]), (step, got, want)


@pytest.mark.slow
def test_two_processes_match_one_and_share_checkpoints(wordnet_data_dir, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    cache = tmp_path / "compilation_cache"
    run_processes(one, wordnet_data_dir, 1, cache)  # 1 process, 8 devices.
    reference = losses(one)
    assert sorted(reference) == list(range(1, STEPS + 1))

    logs = run_processes(two, wordnet_data_dir, 2, cache)  # 2 processes x 4 devices.
    assert "Process 0 of 2 (explicit" in logs[0]
    assert_close(losses(two), reference, range(1, STEPS + 1))
    differences = [abs(losses(two)[s] - reference[s]) / reference[s] for s in reference]
    print(f"max relative train-loss difference, 2 vs 1 process: {max(differences):.2e}")
    # Process 0 wrote the run's files; both took part in the checkpoints.
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == [str(HALF), str(STEPS)]
    for name in ("results.json", "run.json", "config.json", "learning_curves.png"):
        assert os.path.exists(os.path.join(two, name)), name
    run = json.load(open(os.path.join(two, "run.json")))
    assert run["environment"]["process_count"] == 2

    # Two processes' checkpoint at step 3 -> one process finishes steps 4..6.
    rewind(two, str(tmp_path / "two_to_one"), HALF)
    run_processes(str(tmp_path / "two_to_one"), wordnet_data_dir, 1, cache)
    assert_close(losses(tmp_path / "two_to_one"), reference, range(HALF + 1, STEPS + 1))

    # One process's checkpoint at step 3 -> two processes finish steps 4..6.
    rewind(one, str(tmp_path / "one_to_two"), HALF)
    run_processes(str(tmp_path / "one_to_two"), wordnet_data_dir, 2, cache)
    assert_close(losses(tmp_path / "one_to_two"), reference, range(HALF + 1, STEPS + 1))


def test_settings_from_config_then_environment():
    cfg = scratch.get_config("runlocal").distributed
    assert distributed.explicit_settings(cfg, environ={}) == {}
    assert distributed.initialize(cfg, environ={}) == "single"
    env = {"STRATA_COORDINATOR": "10.0.0.1:1234", "STRATA_NUM_PROCESSES": "4",
           "STRATA_PROCESS_ID": "2", "STRATA_LOCAL_DEVICE_IDS": "0,1"}
    assert distributed.explicit_settings(cfg, environ=env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
        "local_device_ids": [0, 1]}
    cfg.process_id = 3  # The config wins over the environment.
    assert distributed.explicit_settings(cfg, environ=env)["process_id"] == 3
    with pytest.raises(ValueError, match="STRATA_COORDINATOR"):
        distributed.explicit_settings(cfg, environ={"STRATA_NUM_PROCESSES": "2"})
    # One process configured explicitly needs no coordinator service.
    assert distributed.initialize(cfg, environ={**env, "STRATA_NUM_PROCESSES": "1"}) \
        == "single"


def test_cluster_detection():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    assert distributed.detected_cluster(slurm) == "slurm"
    # A one-task allocation (an interactive shell) is a single process.
    assert distributed.detected_cluster({**slurm, "SLURM_NTASKS": "1"}) in (None, "cloud_tpu")
