"""Cluster launchers' dry runs print exactly the commands they would run."""

import os
import shlex
import subprocess
import sys

from launch import slurm, tpu_pod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAIN_ARGS = ["--", "--config", "configs/pretrain_mlm.py:size=base",
             "--config.model.dtype=bfloat16"]


def dry_run_lines(module, *args):
    run = subprocess.run([sys.executable, "-m", f"launch.{module}", "--dry_run", *args],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    return run.stdout.strip().splitlines()


def test_tpu_pod_dry_run_prints_every_command():
    lines = dry_run_lines("tpu_pod", "--name", "strata-pod", "--zone", "us-west4-a",
                          "--create", "--delete", "--workdir", "gs://my-bucket/runs/mlm",
                          *MAIN_ARGS)
    commands = [shlex.split(line) for line in lines]
    assert commands[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert "--accelerator-type=v5litepod-16" in commands[0]
    assert commands[1][0] == "tar" and commands[2][4] == "scp"
    ssh = [c for c in commands if c[4:5] == ["ssh"]]
    assert all(c[5] == "strata-pod" and "--worker=all" in c and
               c[c.index("--zone") + 1] == "us-west4-a" for c in ssh)
    scripts = [c[-1].removeprefix("--command=") for c in ssh]
    assert any("bash launch/setup.sh" in s and "jax[tpu]" in s for s in scripts)
    assert any("gcsfuse --implicit-dirs my-bucket /gcs/my-bucket" in s for s in scripts)
    # The same training command on every worker, the workdir on the mounted bucket.
    assert scripts[-1] == ("cd strata && .venv/bin/python -m launch.main --config "
                           "configs/pretrain_mlm.py:size=base --config.model.dtype=bfloat16 "
                           "--workdir=/gcs/my-bucket/runs/mlm")
    assert commands[-1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"]


def test_tpu_pod_clones_instead_of_copying():
    args = tpu_pod.parse_args(["--name", "p", "--zone", "z", "--repo_url",
                               "https://github.com/me/strata.git", "--skip_setup",
                               "--workdir", "/shared/run", *MAIN_ARGS])
    commands = tpu_pod.commands(args)
    assert len(commands) == 2  # Clone, run: no create, copy, setup, mount or delete.
    assert "git clone --depth 1 --branch main https://github.com/me/strata.git strata" \
        in commands[0][-1]
    assert commands[1][-1].endswith("--workdir=/shared/run")


def test_slurm_dry_run_prints_the_script():
    lines = dry_run_lines("slurm", "--nodes", "2", "--gpus_per_node", "4",
                          "--partition", "gpu", "--workdir", "/shared/runs/mlm", *MAIN_ARGS)
    assert lines[0] == "#!/bin/bash"
    for directive in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
                      "--partition=gpu"):
        assert f"#SBATCH {directive}" in lines
    assert "export STRATA_NUM_PROCESSES=$SLURM_NTASKS" in lines
    assert any(line.startswith("export STRATA_COORDINATOR=$COORDINATOR_HOST:") for line in lines)
    srun = shlex.split(lines[-1])
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"]
    assert srun[4] == ("STRATA_PROCESS_ID=$SLURM_PROCID STRATA_LOCAL_DEVICE_IDS=$SLURM_LOCALID "
                       "exec .venv/bin/python -m launch.main --config "
                       "configs/pretrain_mlm.py:size=base --config.model.dtype=bfloat16 "
                       "--workdir=/shared/runs/mlm")


def test_slurm_one_process_per_node():
    script = slurm.sbatch_script(slurm.parse_args(
        ["--per_node", "--gpus_per_node", "8", "--workdir", "/w", *MAIN_ARGS]))
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --cpus-per-task=64" in script
    assert "STRATA_LOCAL_DEVICE_IDS" not in script  # The process owns all the node's GPUs.
