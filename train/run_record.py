"""What makes a run redoable: resolved config, code version, environment."""

import json
import os
import platform
import subprocess
import sys

import jax


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


def write_run_record(workdir, config):
    """Writes `config.json` (resolved) and `run.json` (code version, environment)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    with open(os.path.join(workdir, "run.json"), "w") as f:
        json.dump({"code": code_version(), "environment": environment(),
                   "argv": sys.argv}, f, indent=2)
