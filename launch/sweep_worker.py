"""A worker of `launch.sweep --mode=parallel` (`Workers` in launch/sweep.py): trains the
trials the sweep sends it one after another, in this process, as `--mode=sequential`
does, so a worker pays the start-up once (importing jax and the data libraries, the peak
FLOP/s measured for MFU, forgetting's "before" loss of a checkpoint, ...), not each trial.

Protocol, on the pipes the sweep gave as stdin and stdout, which the worker moves to
other descriptors at start: the sweep writes one pickled `(config_path, workdir, trial,
cli_overrides)` per trial; after the trial (finished or failed) the worker writes the
trial's name and a newline and waits for the next; EOF ends it. During a trial, fds 1
and 2 (prints, absl logging, tqdm, XLA's own stderr) are appended to
`<workdir>/<trial>/train.log`; between trials they go to the sweep's stderr.
A trial that raises is logged to its train.log and the worker goes on; SIGTERM during
training saves a checkpoint and ends the worker (train_in_process raises SystemExit).
"""

import contextlib
import json
import logging
import os
import pickle
import sys

from absl import app
from absl import logging as absl_logging

log = logging.getLogger("strata")


def take_channel():
    """-> (commands, replies): the pipes that came as fds 0 and 1, on descriptors of their
    own (not inherited by subprocesses); fd 0 becomes /dev/null, fd 1 a copy of fd 2."""
    commands = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return commands, replies


@contextlib.contextmanager
def output_to(path):
    """fds 1 and 2, and with them sys.stdout, sys.stderr and C++ writes, appended to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def serve(commands, replies):
    from launch import sweep

    while True:
        try:
            config_path, workdir, trial, cli_overrides = pickle.load(commands)
        except EOFError:  # The sweep is done with this worker.
            return
        trial_dir = os.path.join(workdir, trial.name)
        os.makedirs(trial_dir, exist_ok=True)
        with output_to(os.path.join(trial_dir, "train.log")):
            log.info("Trial %s in sweep worker %d", trial.name, os.getpid())
            try:
                results = sweep.train_in_process(
                    trial, sweep.checked_config(config_path, trial, cli_overrides), trial_dir)
                print(json.dumps(results, indent=2, default=str))  # As launch.main does.
            except Exception:  # This trial failed (the sweep sees no results.json); go on.
                log.exception("Trial %s failed", trial.name)
            except BaseException as stop:  # Preempted (SIGTERM), sys.exit, Ctrl-C: end.
                log.warning("Trial %s stopped (%r); this worker ends", trial.name, stop)
                raise
        replies.write(trial.name + "\n")
        replies.flush()


def main(channel):
    # As launch.main: our own progress at INFO; libraries (orbax, tfds) at WARNING.
    absl_logging.set_verbosity(absl_logging.WARNING)
    log.setLevel(logging.INFO)
    serve(*channel)


if __name__ == "__main__":
    channel = take_channel()  # Before anything could write to fd 1.
    app.run(lambda argv: main(channel))
