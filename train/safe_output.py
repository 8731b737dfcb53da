"""Outputs that never endanger inputs: checked first, written beside the target, renamed in.

What `launch.export`, `launch.embed` and `launch.ensemble` write goes through here:
- `check_output_apart`: an output that is, holds, or lies inside a run (or any file or
  directory) the command reads is refused before anything is computed or written.
- `check_output_dir` / `check_output_file`: an existing file where a directory is expected
  (or the reverse), or a non-empty directory without --overwrite, is a clear error.
- `staged_dir`: a directory is written into a temporary sibling of the target and renamed
  into place; an old one (--overwrite) is renamed aside first and deleted only once the new
  one is in place, so a failure at any point leaves either the old or the new output.
- `atomic_save_npy`: one array file, written to a temporary sibling and renamed.
Everything written is an ordinary, readable file: 0644 files, 0755 directories (the
temporaries `tempfile` makes are 0600/0700).
"""

import contextlib
import logging
import os
import shutil
import tempfile
import uuid

import numpy as np

log = logging.getLogger("strata")

FILE_MODE, DIR_MODE = 0o644, 0o755


class UnsafeOutputError(ValueError):
    """The output would overwrite, delete or write into something the command reads."""


def _forms(path):
    """The path as given (absolute) and with symlinks resolved: refuse if either overlaps."""
    return {os.path.abspath(path), os.path.realpath(path)}


def _relation(output, protected):
    """-> 'is' | 'holds' | 'lies inside' | None: where `output` stands to `protected`."""
    for o in _forms(output):
        for p in _forms(protected):
            if o == p:
                return "is"
            common = os.path.commonpath([o, p])
            if common == o:
                return "holds"
            if common == p:
                return "lies inside"
    return None


def check_output_apart(output, inputs, argument="--output"):
    """Refuses an `output` that is, holds, or lies inside one of `inputs`.

    inputs: [(argument, path)]: what the command reads (run directories, input files),
    each with the flag that named it, for the message.
    """
    for input_argument, path in inputs:
        relation = _relation(output, path)
        if relation is not None:
            raise UnsafeOutputError(
                f"{argument} {os.path.abspath(output)} {relation} {os.path.abspath(path)} "
                f"({input_argument}), which this command reads: writing there could "
                f"overwrite or delete it; pass an {argument} outside every input")


def _check_parent_chain(path, argument):
    """Each existing ancestor of `path` must be a directory (makedirs fails obscurely)."""
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise NotADirectoryError(f"{argument} {path}: {parent} is a file, not a directory")


def check_output_dir(output, overwrite=False, argument="--output"):
    """An output directory: absent, empty, or (with `overwrite`) any existing directory."""
    output = os.path.abspath(output)
    if os.path.exists(output) and not os.path.isdir(output):
        raise NotADirectoryError(f"{argument} {output} is an existing file; expected a "
                                 f"directory to write (or a path that does not exist yet)")
    _check_parent_chain(output, argument)
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise FileExistsError(f"{argument} {output} exists and is not empty; pass --overwrite "
                              f"to replace it")


def check_output_file(output, argument="--output"):
    """An output file: absent or an existing file (replaced), never a directory."""
    output = os.path.abspath(output)
    if os.path.isdir(output):
        raise IsADirectoryError(f"{argument} {output} is an existing directory; expected a "
                                f"file path")
    _check_parent_chain(output, argument)


def make_readable(root):
    """0755 directories and 0644 files under `root` (itself included), flushed to disk."""
    os.chmod(root, DIR_MODE)
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, DIR_MODE)
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            os.chmod(path, FILE_MODE)
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # Some filesystems cannot sync a directory; the renames still happened.
    finally:
        os.close(fd)


def _remove(path):
    if os.path.islink(path) or not os.path.isdir(path):
        os.remove(path)
    else:
        shutil.rmtree(path)


@contextlib.contextmanager
def staged_dir(output, overwrite=False, argument="--output"):
    """Yields an empty temporary sibling of `output` to fill; on success it becomes `output`.

    An existing `output` (only with `overwrite`, or empty) is renamed aside, the new one
    renamed in, then the old one deleted. On an exception nothing is touched but the
    temporary directory, which is removed.
    """
    output = os.path.abspath(output)
    check_output_dir(output, overwrite, argument)
    parent, name = os.path.split(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent)
    try:
        yield staging
        make_readable(staging)
        check_output_dir(output, overwrite, argument)  # Again: it may have appeared since.
        if not os.path.lexists(output):
            os.rename(staging, output)
        else:
            aside = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:8]}.old")
            os.rename(output, aside)
            try:
                os.rename(staging, output)
            except BaseException:
                os.rename(aside, output)
                raise
            try:
                _remove(aside)
            except OSError as error:  # The new output is in place; only cleanup failed.
                log.warning("Replaced %s, but could not delete the old one, renamed to %s: "
                            "%s", output, aside, error)
        _fsync_dir(parent)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)


def atomic_save_npy(path, array):
    """`np.save(path, array)` whole or not at all; -> the path written (`.npy` appended to
    a name without it, as np.save does)."""
    path = os.path.abspath(path if str(path).endswith(".npy") else f"{path}.npy")
    check_output_file(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
