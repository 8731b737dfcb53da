r"""Writes (and submits) a SLURM batch script running one training command on GPU nodes.

  python -m launch.slurm --nodes 2 --gpus_per_node 8 --partition gpu --time 24:00:00 \
      --workdir /shared/runs/mlm_base -- \
      --config configs/pretrain_mlm.py:size=base --config.model.dtype=bfloat16

One process per GPU (default; each process owns GPU $SLURM_LOCALID) or `--per_node`
(one process per node owning all its GPUs). The script points every process at the
first node as coordinator through $STRATA_COORDINATOR, $STRATA_NUM_PROCESSES and
$STRATA_PROCESS_ID (train/distributed.py); the workdir must be on storage all nodes
share (checkpoints are written by all processes together). `--dry_run` prints the
script and submits nothing; otherwise it is written to `<workdir>/slurm.sbatch` and
passed to `sbatch`.
"""

import argparse
import os
import shlex
import subprocess
import sys

from launch import cluster_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job_name", default="strata")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--per_node", action="store_true",
                        help="One process per node (all its GPUs) instead of per GPU.")
    parser.add_argument("--cpus_per_gpu", type=int, default=8)
    parser.add_argument("--partition", default="")
    parser.add_argument("--account", default="")
    parser.add_argument("--time", default="24:00:00")
    parser.add_argument("--port", type=int, default=12355, help="Coordinator port.")
    parser.add_argument("--repo", default=REPO, help="This checkout, as the nodes see it.")
    parser.add_argument("--workdir", required=True, help="Shared by all nodes.")
    parser.add_argument("--dry_run", action="store_true", help="Print the script only.")
    cluster_args.add_main_args(parser)
    return cluster_args.parse_with_main_args(parser, argv)


def sbatch_script(args):
    tasks_per_node = 1 if args.per_node else args.gpus_per_node
    directives = [
        f"--job-name={args.job_name}",
        f"--nodes={args.nodes}",
        f"--ntasks-per-node={tasks_per_node}",
        f"--gpus-per-node={args.gpus_per_node}",
        f"--cpus-per-task={args.cpus_per_gpu * args.gpus_per_node // tasks_per_node}",
        f"--time={args.time}",
        f"--output={args.workdir}/slurm-%j.out",
        *([f"--partition={args.partition}"] if args.partition else []),
        *([f"--account={args.account}"] if args.account else []),
    ]
    main = [".venv/bin/python", "-m", "launch.main", *args.main_args,
            f"--workdir={args.workdir}"]
    # Per GPU: process i on a node owns GPU $SLURM_LOCALID (of those SLURM gave the node).
    local = "" if args.per_node else "STRATA_LOCAL_DEVICE_IDS=$SLURM_LOCALID "
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {d}" for d in directives),
        "set -euo pipefail",
        f"cd {shlex.quote(args.repo)}",
        "# Process 0 runs on the first node; it hosts the coordinator.",
        'COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export STRATA_COORDINATOR=$COORDINATOR_HOST:{args.port}",
        "export STRATA_NUM_PROCESSES=$SLURM_NTASKS",
        "srun --kill-on-bad-exit=1 bash -c "
        + shlex.quote(f"STRATA_PROCESS_ID=$SLURM_PROCID {local}exec {shlex.join(main)}"),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    script = sbatch_script(args)
    if args.dry_run:
        print(script, end="")
        return
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, "slurm.sbatch")
    with open(path, "w") as f:
        f.write(script)
    print(f"sbatch {path}", flush=True)
    subprocess.run(["sbatch", path], check=True)


if __name__ == "__main__":
    main()
