"""Writing a run's record and result files: whole or not at all.

A reader (a sweep deciding whether a trial finished, a plot, `launch.embed`) either sees
the previous complete file or the new complete one, never a torn one: each file is
written to a temporary file beside it, flushed to disk, then renamed over the target.
"""

import json
import os
import tempfile

import jax
import numpy as np


def atomic_write_text(path, text):
    """Writes `text` to `path` atomically (temp file in the same directory, fsync, rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600: results are ordinary, readable files.
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def atomic_write_json(path, obj, **kwargs):
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default, **kwargs))


def write_results(workdir, results):
    """`W/results.json`, from process 0 only; the file that marks a run finished."""
    if jax.process_index() == 0:
        atomic_write_json(os.path.join(workdir, "results.json"), results)
    return results
