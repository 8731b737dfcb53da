"""What makes a run redoable: resolved config, code version, environment; and what a
run left behind, read back.

    W/config.json        the resolved config of the run's first start (never rewritten:
                         it describes the checkpoints; a restart's allowed changes go to
                         the history below)
    W/run.json           code version, environment and argv of the first start
    W/run_history.jsonl  one line per start: time, host, code version, argv, and the
                         config fields changed since the recorded config
    W/results.json       the run's results, the last file it writes (train/run_files.py)
"""

import datetime
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys

import jax

from train.run_files import atomic_write_json, atomic_write_text

log = logging.getLogger("strata")


def code_version(repo_dir=None):
    repo_dir = repo_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", None
    return {"git_commit": commit or None, "git_dirty": dirty}


def environment():
    import flax
    import optax
    import orbax.checkpoint

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax_checkpoint": orbax.checkpoint.__version__,
        "backend": jax.default_backend(),
        "process_count": jax.process_count(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def check_workdir(path):
    """Raises NotADirectoryError when `--workdir` (or a folder above it) is a file: a run
    directory is either new or a previous run's."""
    node = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(node):
        parent = os.path.dirname(node)
        if parent == node:
            return
        node = parent
    if os.path.isdir(node):
        return
    if node == os.path.abspath(os.path.expanduser(path)):
        raise NotADirectoryError(
            f"--workdir {path} is a file; expected a directory (new or a previous run)")
    raise NotADirectoryError(
        f"--workdir {path}: {node} is a file; expected a directory (new or a previous run)")


def write_run_record(workdir, config):
    """Writes `config.json` (resolved) and `run.json` (code version, environment), each
    only when absent: they stay the first start's, the record of what the checkpoints
    were computed with. Each start is logged by `append_run_history`."""
    if jax.process_index() != 0:
        return
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        atomic_write_text(config_path, config.to_json_best_effort(indent=2, sort_keys=True))
    run_path = os.path.join(workdir, "run.json")
    if not os.path.exists(run_path):
        atomic_write_json(run_path, {"code": code_version(), "environment": environment(),
                                     "argv": sys.argv})


def append_run_history(workdir, config, changes):
    """Appends this start to `W/run_history.jsonl` (process 0): UTC time, host, pid, code
    version, argv, the resolved config's sha256 and `changes` ({field: [recorded, now]},
    the config fields this start changed; {} for the first start)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    resolved = (config.to_json_best_effort(sort_keys=True) if hasattr(config, "to_json_best_effort")
                else json.dumps(config, sort_keys=True, default=str))
    entry = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
             "host": socket.gethostname(), "pid": os.getpid(), "code": code_version(),
             "argv": sys.argv, "config_sha256": hashlib.sha256(resolved.encode()).hexdigest(),
             "changes": changes}
    path = os.path.join(workdir, "run_history.jsonl")
    _end_with_newline(path)
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _end_with_newline(path):
    """A line torn by a killed start stays its own (unparseable) line, not this one's."""
    if not os.path.exists(path) or not os.path.getsize(path):
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")


def read_recorded_config(workdir):
    """The run's `config.json` as a dict; None when the workdir holds no run yet."""
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); it records the config "
            f"the checkpoints in {workdir} were trained with: restore it, or start a fresh "
            f"run with another --workdir") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not a config object")
    return config


def read_results(path):
    """A run's `results.json` as a dict, or None when it is missing or incomplete (empty,
    half-written, not a JSON object): the run did not finish. Says which, as a warning."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    if not text.strip():
        log.warning("%s is empty: the run did not finish", path)
        return None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as e:
        log.warning("%s is incomplete (%s at line %d, %d bytes): the run did not finish",
                    path, e.msg, e.lineno, len(text))
        return None
    if not isinstance(results, dict):
        log.warning("%s holds a JSON %s, not a results object: the run did not finish",
                    path, type(results).__name__)
        return None
    return results
