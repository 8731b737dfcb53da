r"""Runs one training command on every worker of a Cloud TPU VM slice.

  python -m launch.tpu_pod --name strata-v5e-16 --zone us-west4-a \
      --accelerator v5litepod-16 --version v2-alpha-tpuv5-lite --create \
      --workdir gs://MY_BUCKET/runs/mlm_base -- \
      --config configs/pretrain_mlm.py:size=base --config.model.dtype=bfloat16

Steps, each a `gcloud` command (`--dry_run` prints them all and runs none):
1. `--create`: create the slice (`gcloud compute tpus tpu-vm create`);
2. copy this checkout to every worker (a tarball of the working tree, or `--repo_url`
   to `git clone` it there instead);
3. install on every worker: WordNet, `bash launch/setup.sh`, `jax[tpu]`, and gcsfuse
   mounting the workdir's bucket at `/gcs/<bucket>` (checkpoints are written by all
   workers together, so the workdir must be shared storage);
4. run `python -m launch.main ... --workdir /gcs/<bucket>/<path>` on all workers at once
   (`--worker=all`); JAX finds the other workers itself on Cloud TPU
   (train/distributed.py), so the command is the same everywhere;
5. `--delete`: delete the slice afterwards.
"""

import argparse
import os
import shlex
import subprocess
import sys

from launch import cluster_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "strata"
TARBALL = "/tmp/strata_code.tar.gz"
GCSFUSE_INSTALL = (
    'echo "deb https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" '
    "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
    "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg "
    "| sudo gpg --dearmor --yes -o /etc/apt/trusted.gpg.d/gcsfuse.gpg && "
    "sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse wordnet-base"
)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="TPU VM slice name.")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default="", help="Default: gcloud's configured one.")
    parser.add_argument("--accelerator", default="v5litepod-16", help="With --create.")
    parser.add_argument("--version", default="v2-alpha-tpuv5-lite", help="TPU VM image.")
    parser.add_argument("--create", action="store_true", help="Create the slice first.")
    parser.add_argument("--spot", action="store_true", help="With --create: spot VMs.")
    parser.add_argument("--delete", action="store_true", help="Delete the slice at the end.")
    parser.add_argument("--repo_url", default="", help="git clone this instead of copying.")
    parser.add_argument("--revision", default="main", help="With --repo_url.")
    parser.add_argument("--skip_setup", action="store_true", help="Code and venv are there.")
    parser.add_argument("--workdir", required=True,
                        help="gs://bucket/path (mounted on every worker) or a shared path.")
    parser.add_argument("--dry_run", action="store_true", help="Print commands, run none.")
    cluster_args.add_main_args(parser)
    return cluster_args.parse_with_main_args(parser, argv)


def worker_workdir(workdir):
    """gs://bucket/path -> (bucket, /gcs/bucket/path); any other path is used as is."""
    if not workdir.startswith("gs://"):
        return None, workdir
    bucket, _, path = workdir[len("gs://"):].partition("/")
    return bucket, f"/gcs/{bucket}/{path}".rstrip("/")


def commands(args):
    """The commands to run, in order: lists of argv (run here)."""
    where = ["--zone", args.zone] + (["--project", args.project] if args.project else [])
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]

    def on_all_workers(script):
        return [*tpu, "ssh", args.name, *where, "--worker=all", f"--command={script}"]

    steps = []
    if args.create:
        steps.append([*tpu, "create", args.name, *where, f"--accelerator-type={args.accelerator}",
                      f"--version={args.version}", *(["--spot"] if args.spot else [])])
    if args.repo_url:
        steps.append(on_all_workers(
            f"rm -rf {REMOTE_DIR} && git clone --depth 1 --branch {shlex.quote(args.revision)} "
            f"{shlex.quote(args.repo_url)} {REMOTE_DIR}"))
    else:  # The working tree as it is, uncommitted edits included.
        steps.append(["tar", "-czf", TARBALL, "-C", REPO, "--exclude=.venv", "--exclude=runs",
                      "--exclude=.git", "--exclude=__pycache__", "."])
        steps.append([*tpu, "scp", TARBALL, f"{args.name}:~/", *where, "--worker=all"])
        steps.append(on_all_workers(
            f"rm -rf {REMOTE_DIR} && mkdir {REMOTE_DIR} && "
            f"tar -xzf {os.path.basename(TARBALL)} -C {REMOTE_DIR}"))
    bucket, workdir = worker_workdir(args.workdir)
    if not args.skip_setup:
        install = [GCSFUSE_INSTALL, f"cd {REMOTE_DIR}", "bash launch/setup.sh",
                   ".venv/bin/python -m pip install -q -U 'jax[tpu]'"]
        steps.append(on_all_workers(" && ".join(install)))
    if bucket:
        steps.append(on_all_workers(
            f"sudo mkdir -p /gcs/{bucket} && sudo chown $USER /gcs/{bucket} && "
            f"(mountpoint -q /gcs/{bucket} || gcsfuse --implicit-dirs {bucket} /gcs/{bucket})"))
    main = [".venv/bin/python", "-m", "launch.main", *args.main_args, f"--workdir={workdir}"]
    steps.append(on_all_workers(f"cd {REMOTE_DIR} && {shlex.join(main)}"))
    if args.delete:
        steps.append([*tpu, "delete", args.name, *where, "--quiet"])
    return steps


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for command in commands(args):
        print(shlex.join(command), flush=True)
        if not args.dry_run:
            subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
