"""One owner per workdir: an advisory lock on `W/.lock`, taken before anything is written.

  with WorkdirLock(workdir):      # Creates W; fails at once if another run holds it.
      ...                         # Write the run record, train, checkpoint, results.

The lock is an exclusive, non-blocking `fcntl.flock` on `W/.lock`; the file records who
holds it (pid, host, start time, argv) so that a second run can say whom it collided with.
The kernel drops a flock when its process dies, so after a crash or SIGKILL the next run
simply gets it; the record the dead run left behind is then reported in a warning.

Where the flock cannot be trusted the record decides, conservatively:
- flock granted, but the record names a *live* process on this host that started before
  the record was written (checked against its start time in /proc): its lock is not in
  effect (a filesystem without flock, or the file was deleted and recreated under it), yet
  the run is alive -> refused. A pid reused by an unrelated process is taken over.
- flock granted, but the record names *another host* and was refreshed recently: locks
  may not cross hosts on this filesystem (NFS mounted `nolock`, FUSE buckets) -> refused
  until the record is older than `STALE_AFTER_S`. The holder refreshes its file's mtime
  every `HEARTBEAT_S` from a daemon thread for this reason.

Only process 0 takes the lock on multi-host (`process_index`); the others get a no-op.
Re-entrance: a thread that holds a workdir's lock may take it again (nested `with`, as an
entry point and the loop it calls both do); only the outermost exit releases it. Another
thread of the same process is refused, like another process. The lock file is emptied,
not deleted, on release: deleting it would let two runs lock two different files.
"""

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time

log = logging.getLogger("strata")

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0  # How often a holder refreshes the lock file's mtime.
STALE_AFTER_S = 300.0  # A record from another host older than this is taken over.

_held = {}  # (st_dev, st_ino) of a locked workdir -> its _Holding.
_held_guard = threading.Lock()


class _Holding:
    """One held flock: its file, the thread that took it, how many enters it counts."""

    def __init__(self, fd, key):
        self.fd, self.key, self.depth = fd, key, 1
        self.owner = (os.getpid(), threading.get_ident())
        self.stop = threading.Event()
        self.heartbeat = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                          daemon=True)
        self.heartbeat.start()

    def _beat(self):
        while not self.stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.fd)
            except OSError:
                pass  # The next beat retries; a missed one only ages the record.


class WorkdirBusyError(RuntimeError):
    """Another run (or another thread of this one) holds the workdir."""


def _process_start(pid):
    """-> the process's start time in clock ticks since boot (/proc/<pid>/stat field 22),
    or None where unknown (no /proc, a zombie, another platform)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # The name may hold spaces and ')'.
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _alive(pid):
    """Whether `pid` names a running (not zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Someone else's process: alive.
        return True
    except OverflowError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # No /proc: os.kill said it exists.


def _describe(record):
    """A holder in words: 'pid 123 on host-a since 2024-05-01T12:00:00+00:00 (python -m ...)'."""
    if not record:
        return "an unknown process (its lock file is empty or unreadable)"
    argv = " ".join(record.get("argv") or [])
    return (f"pid {record.get('pid')} on {record.get('host')} since {record.get('since')}"
            + (f" ({argv})" if argv else ""))


class WorkdirLock:
    """Context manager holding `workdir`'s lock; see the module docstring.

    process_index: this process's index (default `jax.process_index()`); only 0 locks.
    """

    def __init__(self, workdir, process_index=None):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        if process_index is None:
            import jax

            process_index = jax.process_index()
        self.active = process_index == 0
        self._entered = []  # The _Holding of each enter not yet exited (nesting allowed).

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    @property
    def held(self):
        return bool(self._entered)

    # --- Acquire -------------------------------------------------------------------
    def acquire(self):
        if not self.active:
            return self
        if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise NotADirectoryError(f"workdir {self.workdir} exists and is not a directory")
        os.makedirs(self.workdir, exist_ok=True)
        stat = os.stat(self.workdir)
        key = (stat.st_dev, stat.st_ino)  # The same directory under any path.
        with _held_guard:
            holding = _held.get(key)
            if holding is not None:
                if holding.owner != (os.getpid(), threading.get_ident()):
                    who = ("another thread of this process" if holding.owner[0] == os.getpid()
                           else "the process this one was forked from")
                    raise WorkdirBusyError(
                        f"workdir {self.workdir} is already held by {who} (pid "
                        f"{holding.owner[0]}): one run per workdir; pass another workdir to "
                        f"the second run")
                holding.depth += 1  # Re-entered by the thread holding it.
            else:
                holding = _held[key] = _Holding(self._take(), key)
            self._entered.append(holding)
        return self

    def _take(self):
        """-> the fd of the lock file, flocked, holding this process's record."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkdirBusyError(self._busy_message(self._read_record(fd, wait=True),
                                                          "holds it")) from None
            self._check_previous(fd)
            self._write_record(fd)
        except BaseException:
            os.close(fd)  # Also drops the flock if we had it.
            raise
        return fd

    def _busy_message(self, record, how):
        stop = (f"stop it (kill {record['pid']} on {record.get('host')})"
                if record and record.get("pid") else "stop it")
        return (f"workdir {self.workdir} is in use: {_describe(record)} {how}. One run per "
                f"workdir: wait for that run to finish, {stop}, or pass another --workdir. "
                f"Lock file: {self.path}")

    def _read_record(self, fd, wait=False):
        """-> the lock file's record (a dict), or None if empty or torn. With `wait`, a
        holder that has only just locked gets half a second to write its record."""
        deadline = time.monotonic() + (0.5 if wait else 0.0)
        while True:
            text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")
            try:
                record = json.loads(text)
                if isinstance(record, dict):
                    return record
            except ValueError:
                pass
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _check_previous(self, fd):
        """We hold the flock: decide what the record a previous holder left means."""
        record = self._read_record(fd)
        if not record:
            return  # Released cleanly (emptied), or never used.
        pid, host = record.get("pid"), record.get("host")
        if host == socket.gethostname() and isinstance(pid, int):
            if pid == os.getpid():
                why = "its pid is now this process's"
            elif _alive(pid):
                recorded, actual = record.get("pid_start"), _process_start(pid)
                if recorded is None or actual is None or recorded == actual:
                    raise WorkdirBusyError(self._busy_message(
                        record, "is alive and named as holder, but its lock is not in effect "
                        "(does this filesystem support flock?); if that process is not a "
                        f"strata run on this workdir, delete {self.path}"))
                why = f"pid {pid} now belongs to another process"
            else:
                why = "it is no longer running"
        else:
            age = time.time() - os.fstat(fd).st_mtime
            if age < STALE_AFTER_S:
                raise WorkdirBusyError(self._busy_message(
                    record, f"may still hold it (its lock file was refreshed {age:.0f} s ago, "
                    "and locks may not reach across hosts on this filesystem); it is taken "
                    f"over once {STALE_AFTER_S:.0f} s old, or delete it if that run is gone"))
            why = f"its lock file has not been refreshed for {age:.0f} s"
        log.warning("Taking over workdir %s from %s: %s (it did not release the lock; it "
                    "probably crashed or was killed).", self.workdir, _describe(record), why)

    def _write_record(self, fd):
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "argv": list(sys.argv), "pid_start": _process_start(os.getpid())}
        data = (json.dumps(record, indent=2) + "\n").encode()
        # In place, not renamed over: the flock belongs to this file's inode.
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    # --- Release -------------------------------------------------------------------
    def release(self):
        """Exits the innermost enter; the outermost one unlocks. A no-op when not held, and
        in a forked child (the lock stays its parent's)."""
        if not self._entered:
            return
        holding = self._entered[-1]
        if holding.owner[0] != os.getpid():
            return
        self._entered.pop()
        with _held_guard:
            holding.depth -= 1
            if holding.depth > 0:
                return
            _held.pop(holding.key, None)
            holding.stop.set()
            holding.heartbeat.join(timeout=5.0)  # Before the fd closes (and is reused).
            try:
                os.ftruncate(holding.fd, 0)  # No record left to mistake for a holder.
            finally:
                fcntl.flock(holding.fd, fcntl.LOCK_UN)
                os.close(holding.fd)


hold_workdir = WorkdirLock
