"""One owner per workdir: a second run fails naming the first; dead holders are taken over."""

import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from train import workdir_lock
from train.workdir_lock import WorkdirBusyError, WorkdirLock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOLDER = """
import sys
from train.workdir_lock import WorkdirLock
with WorkdirLock(sys.argv[1], process_index=0):
    print("locked", flush=True)
    sys.stdin.readline()  # Until the test closes stdin (or kills us).
print("released", flush=True)
"""


def start_holder(workdir):
    """A second process holding `workdir`'s lock; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "locked":
        proc.kill()
        pytest.fail(f"holder did not lock: {line!r} {proc.communicate(timeout=10)}")
    return proc


def lock(workdir):
    return WorkdirLock(workdir, process_index=0)


def record(workdir):
    text = (workdir / ".lock").read_text()
    return json.loads(text) if text else None


def write_record(workdir, **fields):
    os.makedirs(workdir, exist_ok=True)
    entry = {"pid": 1, "host": socket.gethostname(), "since": "2024-01-01T00:00:00+00:00",
             "argv": ["launch/main.py", "--workdir", str(workdir)], **fields}
    (workdir / ".lock").write_text(json.dumps(entry))


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)  # Reaped: no zombie left under this pid.
    return proc.pid


def test_a_second_process_fails_naming_the_holder_until_it_exits(tmp_path, caplog):
    workdir = tmp_path / "run"
    holder = start_holder(workdir)
    try:
        assert record(workdir)["pid"] == holder.pid
        with pytest.raises(WorkdirBusyError) as error:
            lock(workdir).acquire()
        message = str(error.value)
        assert f"pid {holder.pid} on {socket.gethostname()} since 20" in message
        assert "another --workdir" in message and str(workdir) in message
    finally:
        holder.stdin.close()  # A normal exit releases the lock.
        assert holder.wait(timeout=60) == 0
    assert holder.stdout.read().strip() == "released"
    assert (workdir / ".lock").read_text() == ""  # Emptied on release, not deleted.
    with caplog.at_level(logging.WARNING, logger="strata"), lock(workdir):
        assert record(workdir)["pid"] == os.getpid()
        assert record(workdir)["argv"] == sys.argv
    assert "Taking over" not in caplog.text


def test_a_killed_holder_is_taken_over_with_a_warning(tmp_path, caplog):
    workdir = tmp_path / "run"
    holder = start_holder(workdir)
    holder.kill()  # SIGKILL: no cleanup, its record stays behind.
    holder.wait(timeout=60)
    assert record(workdir)["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="strata"), lock(workdir):
        assert record(workdir)["pid"] == os.getpid()
    assert f"Taking over workdir {workdir} from pid {holder.pid}" in caplog.text
    assert "no longer running" in caplog.text


def test_a_stale_record_of_a_dead_pid_is_taken_over(tmp_path, caplog):
    pid = dead_pid()
    write_record(tmp_path, pid=pid)
    with caplog.at_level(logging.WARNING, logger="strata"), lock(tmp_path) as held:
        assert held.held and record(tmp_path)["pid"] == os.getpid()
    assert f"from pid {pid} on {socket.gethostname()}" in caplog.text
    assert record(tmp_path) is None


def test_a_live_holder_whose_flock_is_missing_is_refused_a_reused_pid_is_not(tmp_path,
                                                                            caplog):
    # Flock granted yet the record names a live process (a filesystem without flock):
    # refused. The same pid with another start time is an unrelated process: taken over.
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        start = workdir_lock._process_start(sleeper.pid)
        if start is None:
            pytest.skip("no /proc: process start times unknown")
        write_record(tmp_path, pid=sleeper.pid, pid_start=start)
        with pytest.raises(WorkdirBusyError, match=f"pid {sleeper.pid} .*not in effect"):
            lock(tmp_path).acquire()
        assert record(tmp_path)["pid"] == sleeper.pid  # Left as it was.
        write_record(tmp_path, pid=sleeper.pid, pid_start=start - 1)
        with caplog.at_level(logging.WARNING, logger="strata"), lock(tmp_path):
            assert record(tmp_path)["pid"] == os.getpid()
        assert "now belongs to another process" in caplog.text
    finally:
        sleeper.kill()
        sleeper.wait(timeout=60)


def test_another_hosts_record_is_refused_while_fresh(tmp_path, caplog):
    # Locks may not reach across hosts (NFS nolock): a recently refreshed record wins.
    write_record(tmp_path, pid=4242, host="elsewhere")
    with pytest.raises(WorkdirBusyError, match="pid 4242 on elsewhere .*refreshed"):
        lock(tmp_path).acquire()
    old = time.time() - workdir_lock.STALE_AFTER_S - 60
    os.utime(tmp_path / ".lock", (old, old))
    with caplog.at_level(logging.WARNING, logger="strata"), lock(tmp_path):
        assert record(tmp_path)["host"] == socket.gethostname()
    assert "from pid 4242 on elsewhere" in caplog.text


def test_reentrance_same_thread_nests_another_thread_is_refused(tmp_path):
    outer = lock(tmp_path)
    with outer:
        with lock(tmp_path), outer:  # Nested enters (the entry point and the loop).
            assert record(tmp_path)["pid"] == os.getpid()
        assert record(tmp_path)["pid"] == os.getpid()  # Still held by the outer enter.
        errors = []

        def other_thread():
            try:
                lock(tmp_path).acquire()
            except WorkdirBusyError as error:
                errors.append(str(error))

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(timeout=60)
        assert errors and "another thread of this process" in errors[0]
    assert record(tmp_path) is None and not outer.held
    with lock(tmp_path):  # Free again.
        pass


def test_other_processes_of_a_multihost_run_do_not_lock(tmp_path):
    with lock(tmp_path / "run"), WorkdirLock(tmp_path / "run", process_index=1) as other:
        assert not other.held
    WorkdirLock(tmp_path / "absent", process_index=1).acquire()
    assert not (tmp_path / "absent").exists()


def test_a_file_as_workdir_is_a_clear_error(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="workdir .*run exists and is not a dir"):
        lock(tmp_path / "run").acquire()
