"""The `-- <launch.main arguments>` tail shared by the cluster launchers (slurm, tpu_pod)."""

import argparse


def add_main_args(parser):
    parser.add_argument("main_args", nargs=argparse.REMAINDER,
                        help="After --: arguments for python -m launch.main.")


def parse_with_main_args(parser, argv):
    """parser.parse_args(argv) with `main_args` stripped of its leading `--` and checked
    to name a config (the one thing every launch.main run needs)."""
    args = parser.parse_args(argv)
    if args.main_args[:1] == ["--"]:
        args.main_args = args.main_args[1:]
    if not any(a.startswith("--config") for a in args.main_args):
        parser.error("give the launch.main arguments after --, e.g. -- --config configs/X.py")
    return args
