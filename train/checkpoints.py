"""Orbax checkpoints: the last K steps and the best by an eval metric, async, resumable.

A checkpoint holds the train state and the data iterator's state, so a resumed run sees
exactly the batches it would have seen. Restoring takes an abstract state whose
shardings belong to the *current* mesh, so a run may resume on a different mesh.

Verified: once orbax has finalised a step, process 0 writes `<step>/strata_manifest.json`
(the size and sha256 of every file under the step). Saves are async, so a thread per
manager waits for orbax to finalise the step, then hashes it while training goes on; the
next save of that manager (orbax's finalize may delete old steps), `wait()` and `close()`
join it. Orbax renames a step into place on process 0 only after every host's bytes are
written (its async_write_complete barrier), so process 0 hashing the final directory
sees all hosts' files; no other host writes or needs the manifest.

`restore_latest_intact` restores the newest step that passes its manifest (missing file,
size or hash -> corrupt), loads, and holds finite params and optimizer state; each newer
step that fails is set aside (renamed `<step>.corrupt-<UTC time>`, never deleted) with a
warning naming it and the reason. A step without a manifest (older code, or a stop
before the manifest was written) is restored unverified, with a warning, when orbax
reads it and its values are finite. A checkpoint whose structure or shapes differ from
the current model is a config mismatch, not corruption: it raises, and nothing moves.
"""

import concurrent.futures
import hashlib
import json
import logging
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from train.param_rules import path_string
from train.run_files import atomic_write_json

log = logging.getLogger("strata")

MANIFEST = "strata_manifest.json"
MANIFEST_FORMAT = "strata-checkpoint-manifest/1"
SET_ASIDE_NOTE = "strata_set_aside.json"
_HASH_CHUNK = 8 << 20  # Bytes per read: large enough that hashing, not Python, dominates.


class CorruptCheckpointError(RuntimeError):
    """A checkpoint step whose bytes or values cannot be trusted (or none is left)."""

    def __init__(self, message, step=None, reason=None):
        super().__init__(message)
        self.step, self.reason = step, reason


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tree or shapes differ from the model being restored into."""


def abstract_with_shardings(tree, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# --- Manifests: what a finalised step holds, byte for byte -----------------------------

def _step_files(step_dir):
    """-> sorted relative paths of the regular files under `step_dir`, manifest excluded."""
    files = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), step_dir)
            if relative != MANIFEST and not name.startswith(f".{MANIFEST}."):
                files.append(relative)
    return sorted(files)


def _sha256(path):
    digest = hashlib.sha256()  # hashlib releases the GIL: files hash in parallel threads.
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_files(step_dir, relative_paths):
    """-> [sha256 hex] of each file, hashed by up to 8 threads."""
    workers = max(1, min(8, os.cpu_count() or 1, len(relative_paths)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda r: _sha256(os.path.join(step_dir, r)), relative_paths))


def write_manifest(step_dir):
    """Writes `<step_dir>/strata_manifest.json`: {relative path: {bytes, sha256}}."""
    relative = _step_files(step_dir)
    sizes = [os.path.getsize(os.path.join(step_dir, r)) for r in relative]
    hashes = _hash_files(step_dir, relative)
    manifest = {"format": MANIFEST_FORMAT, "algorithm": "sha256",
                "total_bytes": int(sum(sizes)),
                "files": {r: {"bytes": s, "sha256": h}
                          for r, s, h in zip(relative, sizes, hashes)}}
    atomic_write_json(os.path.join(step_dir, MANIFEST), manifest)
    return manifest


def verify_manifest(step_dir):
    """-> ("verified" | "unverified" | "corrupt", reason or None) for one step directory.

    "unverified": no manifest (older code, or a stop before it was written). Files the
    manifest does not list are logged, not rejected (orbax reads only what it wrote).
    """
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isdir(step_dir):
        return "corrupt", "the step directory is missing"
    if not os.path.exists(path):
        return "unverified", None
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("algorithm") != "sha256":
            return "corrupt", f"unknown manifest algorithm {manifest.get('algorithm')!r}"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return "corrupt", f"its {MANIFEST} is unreadable ({error})"
    problems = []
    for relative, entry in sorted(files.items()):  # Sizes first: cheap, and catch truncation.
        full = os.path.join(step_dir, relative)
        if not os.path.isfile(full):
            problems.append(f"{relative} is missing")
        elif os.path.getsize(full) != entry["bytes"]:
            problems.append(f"{relative} has {os.path.getsize(full)} bytes, "
                            f"the manifest {entry['bytes']}")
    if not problems:
        relative = sorted(files)
        for r, digest in zip(relative, _hash_files(step_dir, relative)):
            if digest != files[r]["sha256"]:
                problems.append(f"{r} has changed bytes (sha256 mismatch)")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        return "corrupt", "; ".join(problems[:3]) + more
    extra = sorted(set(_step_files(step_dir)) - set(files))
    if extra:
        log.warning("Checkpoint %s holds files its manifest does not list (ignored): %s",
                    step_dir, extra[:5])
    return "verified", None


_leaf_is_finite = jax.jit(lambda x: jnp.isfinite(x).all())  # Compiled once per shape.


def _is_finite(x):
    if isinstance(x, jax.Array) and not (
            x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices())):
        return bool(_leaf_is_finite(x))  # On the accelerator (or across hosts).
    return bool(np.isfinite(np.asarray(x)).all())  # Host memory: no compile, no copy.


def nonfinite_leaves(tree):
    """-> ["params/encoder/.../kernel", ...]: floating leaves holding a NaN or an inf."""
    return [path_string(path) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
            and not _is_finite(x)]


def _structure_mismatch(saved_tree, abstract_state):
    """-> a description of how the saved tree differs (paths, shapes), or None."""
    saved = {k: tuple(getattr(v, "shape", ()))
             for k, v in ocp.tree.to_flat_dict(saved_tree, sep="/").items()}
    wanted = {k: tuple(v.shape)
              for k, v in ocp.tree.to_flat_dict(abstract_state, sep="/").items()}
    missing, unexpected = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    reshaped = [f"{k} {saved[k]} -> {wanted[k]}" for k in sorted(set(saved) & set(wanted))
                if saved[k] != wanted[k]]
    parts = [f"{label}: {names[:5]}{' ...' if len(names) > 5 else ''}"
             for label, names in (("not in the checkpoint", missing),
                                  ("only in the checkpoint", unexpected),
                                  ("shape changed", reshaped)) if names]
    return "; ".join(parts) or None


def _saved_state_tree(step_dir):
    """-> the saved train state's tree of ArrayMetadata (shapes, dtypes), read from disk."""
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(epath.Path(step_dir) / "state")
    finally:
        handler.close()
    return getattr(metadata, "tree", metadata)


def newest_verified_step_dir(directory):
    """-> the newest `<directory>/<step>` that passes its manifest (or has none), or None.

    For readers of a run (init_from, export, ensemble, embed): corrupt steps are skipped
    with a warning but left in place; only the training run sets them aside.
    """
    if not os.path.isdir(directory):
        return None
    for step in sorted((int(s) for s in os.listdir(directory) if s.isdigit()), reverse=True):
        step_dir = os.path.join(directory, str(step))
        status, reason = verify_manifest(step_dir)
        if status != "corrupt":
            if status == "unverified":
                log.warning("Checkpoint %s has no %s: reading it unverified.", step_dir,
                            MANIFEST)
            return step_dir
        log.warning("Skipping corrupt checkpoint %s: %s", step_dir, reason)
    return None


def _agree(value, code_of, names):
    """Process 0's `value` on every process (multi-host): one int code, broadcast."""
    if jax.process_count() == 1:
        return value
    code = multihost_utils.broadcast_one_to_all(
        np.int32(code_of(value) if jax.process_index() == 0 else 0))
    return names[int(code)]


# --- The manager pair ------------------------------------------------------------------

class Checkpoints:
    """`<workdir>/checkpoints` keeps the last `keep` steps; `<workdir>/best` the best one."""

    def __init__(self, workdir, train_cfg):
        self.best_metric = train_cfg.best_metric
        self.latest = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=train_cfg.keep_checkpoints, enable_async_checkpointing=True,
                create=True),
            item_names=("state", "data"),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "best"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda m: m[self.best_metric],
                best_mode=train_cfg.best_mode, enable_async_checkpointing=True, create=True),
            item_names=("state", "data"),
        )
        # Per manager: the steps saved here still owed a manifest (process 0), and the
        # thread that writes them. Only steps saved here get one: stamping an older step
        # would vouch for bytes nobody checked.
        self._owed = {id(self.latest): [], id(self.best): []}
        self._hashing = {id(self.latest): None, id(self.best): None}

    @staticmethod
    def _save_args(state, data_state):
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))

    @staticmethod
    def step_dir(manager, step):
        return os.path.join(str(manager.directory), str(step))

    def save(self, step, state, data_state, *, force=False):
        if self.latest.latest_step() == step:
            return False
        return self._save(self.latest, step, args=self._save_args(state, data_state),
                          force=force)

    def save_best(self, step, state, data_state, metrics):
        if self.best_metric not in metrics:
            raise KeyError(
                f"config.train.best_metric={self.best_metric!r} is not among the eval "
                f"metrics {sorted(metrics)}")
        return self._save(self.best, step, args=self._save_args(state, data_state),
                          metrics={k: float(v) for k, v in metrics.items()})

    def _save(self, manager, step, **kwargs):
        """Saves through orbax; a thread writes the manifest once orbax has finalised it."""
        # The previous one first: this save's finalize may delete the step it hashes.
        self._join_manifests(manager)
        saved = manager.save(step, **kwargs)
        if saved and jax.process_index() == 0:
            self._owed[id(manager)].append(step)
            thread = threading.Thread(target=self._manifest_when_final, args=(manager,),
                                      name="strata_manifest", daemon=True)
            thread.start()
            self._hashing[id(manager)] = thread
        return saved

    def _manifest_when_final(self, manager):
        try:
            manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - the main thread's next wait raises it too.
            return
        self._write_owed(manager)

    def _write_owed(self, manager):
        """Writes the manifests `manager`'s finalised steps are owed (process 0)."""
        kept = set(manager.all_steps())  # A step orbax has deleted or dropped is skipped.
        step_dirs = [self.step_dir(manager, s) for s in self._owed[id(manager)] if s in kept]
        self._owed[id(manager)] = []
        for step_dir in step_dirs:
            if not os.path.isdir(step_dir):  # Its commit failed (orbax logged why).
                continue
            try:
                write_manifest(step_dir)
            except OSError as error:  # The step stays loadable, unverified.
                log.warning("Could not write the manifest of checkpoint %s: %s",
                            step_dir, error)

    def _join_manifests(self, *managers):
        for manager in managers or (self.latest, self.best):
            thread = self._hashing[id(manager)]
            if thread is not None:
                thread.join()
                self._hashing[id(manager)] = None

    def write_pending_manifests(self):
        """Waits for orbax's saves, then for every manifest they are owed."""
        self._join_manifests()
        for manager in (self.latest, self.best):
            manager.wait_until_finished()
            if jax.process_index() == 0:
                self._write_owed(manager)

    def latest_step(self):
        """The newest step on disk; after `restore_latest_intact`, the one it restored."""
        return self.latest.latest_step()

    def restore(self, abstract_state, step=None, manager=None):
        """-> (state, data_state) at `step` (default: the latest), onto the current mesh.

        Verifies the step first; raises CorruptCheckpointError (nothing is moved) when it
        fails. `restore_latest_intact` is the resume path that falls back.
        """
        manager = manager or self.latest
        step = manager.latest_step() if step is None else step
        return self._restore_checked(manager, step, abstract_state)

    def restore_latest_intact(self, abstract_state):
        """-> (step, state, data_state) of the newest intact step, or None: a fresh run.

        Each newer step that fails verification is renamed `<step>.corrupt-<time>` with
        a warning. Raises CorruptCheckpointError when steps were saved (or set aside
        before) and none is intact: the run must not silently start over.
        """
        return self._restore_newest_intact(self.latest, abstract_state)

    def restore_best(self, abstract_state):
        """-> (step, state, data_state) of `best/`, verified like the latest; or None."""
        return self._restore_newest_intact(self.best, abstract_state)

    def _restore_newest_intact(self, manager, abstract_state):
        self._join_manifests()
        manager.reload()
        set_aside = []
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                state, data_state = self._restore_checked(manager, step, abstract_state)
            except CorruptCheckpointError as error:
                set_aside.append(f"step {step}: {error.reason} -> "
                                 f"{self._set_aside(manager, step, error.reason)}")
                continue
            if set_aside:
                log.warning("Restoring step %d of %s, the newest intact checkpoint.",
                            step, manager.directory)
            return step, state, data_state
        earlier = sorted(n for n in os.listdir(str(manager.directory)) if ".corrupt-" in n)
        if set_aside or earlier:
            raise CorruptCheckpointError(
                f"No intact checkpoint is left in {manager.directory}. Set aside now: "
                f"{set_aside or 'none'}; set aside before: {earlier}. Inspect them, move one "
                f"back under its step number to force it, or start a fresh workdir.")
        return None

    def _restore_checked(self, manager, step, abstract_state):
        """Restores one step; raises CorruptCheckpointError with the reason if it fails."""
        step_dir = self.step_dir(manager, step)

        def corrupt(reason):
            return CorruptCheckpointError(
                f"Checkpoint step {step} in {manager.directory} is corrupt: {reason}",
                step, reason)

        def described(error):
            lines = str(error).splitlines()
            return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"

        status, reason = self._verify_step_dir(step_dir)
        if status == "corrupt":
            raise corrupt(reason)
        verified = status == "verified"  # Then a read error is not about the bytes.
        try:
            saved_tree = _saved_state_tree(step_dir)
        except (MemoryError, jax.errors.JaxRuntimeError):
            raise
        except Exception as error:  # noqa: BLE001 - whatever orbax raises on bad bytes.
            if verified:
                raise
            raise corrupt(f"orbax cannot read its metadata ({described(error)})") from error
        mismatch = _structure_mismatch(saved_tree, abstract_state)
        if mismatch:  # A config change, not corruption: nothing is set aside.
            raise CheckpointMismatchError(
                f"Checkpoint step {step} in {manager.directory} does not fit the model "
                f"being restored ({mismatch}). Resume with the run's own config "
                f"(its config.json), or train the changed model in a fresh workdir.")
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore()))
        except (MemoryError, jax.errors.JaxRuntimeError):
            raise
        except Exception as error:  # noqa: BLE001 - its tree fits, so its bytes are bad.
            if verified:
                raise
            raise corrupt(f"orbax cannot read it ({described(error)})") from error
        bad = nonfinite_leaves(restored.state)
        if bad:
            raise corrupt(f"non-finite values in {bad[:3]}{' ...' if len(bad) > 3 else ''}")
        if not verified:
            log.warning("Checkpoint %s has no %s (older code, or the run stopped before "
                        "writing it): restored unverified; its values are finite.",
                        step_dir, MANIFEST)
        return restored.state, restored.data

    @staticmethod
    def _verify_step_dir(step_dir):
        """verify_manifest on process 0 (it reads every byte once), agreed by all hosts."""
        names = ("verified", "unverified", "corrupt")
        result = verify_manifest(step_dir) if jax.process_index() == 0 else (None, None)
        status = _agree(result[0], names.index, names)
        return status, result[1] if jax.process_index() == 0 else "see process 0's log"

    @staticmethod
    def _set_aside(manager, step, reason):
        """Renames `<dir>/<step>` to `<dir>/<step>.corrupt-<UTC time>`; -> the new path.

        Orbax lists only all-digit names as steps, so the step no longer exists for it."""
        source = Checkpoints.step_dir(manager, step)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = f"{source}.corrupt-* (renamed by process 0)"
        if jax.process_index() == 0:
            target = f"{source}.corrupt-{stamp}"
            suffix = 1
            while os.path.exists(target):
                target, suffix = f"{source}.corrupt-{stamp}-{suffix}", suffix + 1
            os.rename(source, target)
            try:
                atomic_write_json(os.path.join(target, SET_ASIDE_NOTE), {
                    "step": step, "reason": reason, "set_aside_at": stamp})
            except OSError:
                pass  # The rename is what matters; the note only explains it.
            log.warning("Checkpoint step %d in %s is corrupt (%s): set aside as %s, "
                        "not deleted.", step, manager.directory, reason, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"strata_set_aside_{step}")
        manager.reload()
        return target

    def reached_preemption(self, step):
        return self.latest.reached_preemption(step)

    def wait(self):
        self.write_pending_manifests()

    def close(self):
        self.write_pending_manifests()
        self.latest.close()
        self.best.close()
