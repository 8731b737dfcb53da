"""Restarting a run safely: a signal at any phase of a step ends in a checkpoint of the
step the run names; a restart with a changed config is refused with a diff (the record
left intact) unless the change is safe or explicitly allowed; two runs never share a
workdir."""

import json
import os
import signal
import time

import pytest

from configs import scratch
from train import checkpoints as ckpt
from train import loop
from train.resume_check import ConfigChangedError, check_resume, config_changes, is_safe
from train.workdir_lock import WorkdirBusyError, WorkdirLock


def tiny_config(data_dir, **train):
    config = scratch.get_config("runlocal")
    config.data.data_dir = str(data_dir)
    config.data.batch_size = 8
    config.train.update(dict(num_steps=8, log_every=1, eval_every=2, eval_steps=1,
                             final_eval_steps=1, checkpoint_every=3, progress=False),
                        **train)
    return config


def latest_checkpoint(workdir, config):
    checkpoints = ckpt.Checkpoints(workdir, config.train)
    try:
        return checkpoints.latest_step()
    finally:
        checkpoints.close()


# (phase the signal arrives in, at step) -> the step the run must save and exit at: a
# signal before the step's decision is honoured at that step, one after it at the next.
PHASES = [("after_step", 4, 4), ("after_decision", 4, 5), ("after_eval", 4, 5),
          ("after_save", 3, 4)]


@pytest.mark.slow
@pytest.mark.parametrize("phase,at,saved", PHASES)
def test_a_signal_at_any_phase_ends_in_a_checkpoint_of_the_named_step(
        phase, at, saved, wordnet_data_dir, tmp_path, monkeypatch):
    config = tiny_config(wordnet_data_dir)
    pause = 1.5  # Seconds the first invocation spends in step 1 (its train time).

    def hook(p, step):
        if (p, step) == ("after_step", 1):
            time.sleep(pause)
        if (p, step) == (phase, at):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop, "TEST_HOOK", hook)
    start = time.perf_counter()
    results = loop.train_and_evaluate(config, str(tmp_path))
    first_wall = time.perf_counter() - start
    assert results == {"preempted_at_step": saved}
    assert latest_checkpoint(str(tmp_path), config) == saved
    assert not (tmp_path / "results.json").exists()

    monkeypatch.setattr(loop, "TEST_HOOK", None)
    start = time.perf_counter()
    results = loop.train_and_evaluate(config, str(tmp_path))  # Requeued: resumes.
    second_wall = time.perf_counter() - start
    assert results["step"] == 8
    with open(tmp_path / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(1, 9))  # One row per step across the restart.
    # Train time counts both invocations: the first's (with its pause) up to the
    # checkpoint the second resumed from, then the second's.
    first, second = results["train_time_segments_s"]
    assert pause < first < first_wall and 0 < second < second_wall
    assert results["train_time_s"] == pytest.approx(first + second)


@pytest.mark.slow
def test_restart_with_changed_config(wordnet_data_dir, tmp_path):
    workdir = str(tmp_path)
    config = tiny_config(wordnet_data_dir, num_steps=3)
    loop.train_and_evaluate(config, workdir)
    recorded = (tmp_path / "config.json").read_text()

    changed = tiny_config(wordnet_data_dir, num_steps=3)
    changed.optim.lr, changed.data.seq_len = 5e-4, 48
    with pytest.raises(ConfigChangedError) as error:
        loop.train_and_evaluate(changed, workdir)
    message = str(error.value)
    assert "config.optim.lr: 0.001 (recorded) -> 0.0005 (now)" in message
    assert "config.data.seq_len: 64 (recorded) -> 48 (now)" in message
    assert "--allow_config_change=data.seq_len,optim.lr" in message
    assert (tmp_path / "config.json").read_text() == recorded  # The record is intact.

    longer = tiny_config(wordnet_data_dir, num_steps=5, log_every=5)  # Safe changes.
    assert loop.train_and_evaluate(longer, workdir)["step"] == 5
    explicit = tiny_config(wordnet_data_dir, num_steps=6)
    explicit.optim.lr = 5e-4
    assert loop.train_and_evaluate(explicit, workdir, ("optim.lr",))["step"] == 6
    assert (tmp_path / "config.json").read_text() == recorded
    with open(tmp_path / "run_history.jsonl") as f:
        history = [json.loads(line) for line in f]
    assert [h["changes"] for h in history] == [
        {}, {"train.log_every": [1, 5], "train.num_steps": [3, 5]},
        {"optim.lr": [0.001, 0.0005], "train.num_steps": [3, 6]}]


def test_fields_added_to_the_code_since_a_run_started_do_not_block_its_resume(tmp_path):
    """A newer code version adds `post_train.new_knob`: the old run resumes (the field is
    recorded as a change); a changed or removed field is still refused."""
    recorded = {"optim": {"lr": 1e-3}, "post_train": {"kl_coef": 0.1}}
    newer = {"optim": {"lr": 1e-3}, "post_train": {"kl_coef": 0.1, "new_knob": 1}}
    assert check_resume(recorded, newer, str(tmp_path)) == {"post_train.new_knob": [None, 1]}
    with pytest.raises(ConfigChangedError, match="config.optim.lr: 0.001"):
        check_resume(recorded, {**newer, "optim": {"lr": 2e-3}}, str(tmp_path))
    with pytest.raises(ConfigChangedError, match="config.post_train.kl_coef: 0.1 "
                                                 r"\(recorded\) -> None"):
        check_resume(recorded, {"optim": {"lr": 1e-3}, "post_train": {}}, str(tmp_path))


def test_config_diff_and_safe_fields():
    a = {"optim": {"lr": 1e-3}, "mesh": {"data": 8}, "rules": [["a", "b"]]}
    b = {"optim": {"lr": 1e-3}, "mesh": {"data": 2}, "rules": (("a", "c"),)}
    assert config_changes(a, b) == {"mesh.data": [8, 2], "rules": [[["a", "b"]], [["a", "c"]]]}
    assert is_safe("mesh.data") and is_safe("train.num_steps")
    assert not is_safe("optim.lr") and not is_safe("model.hidden") and not is_safe("seed")
    assert is_safe("optim.lr", allowed=("optim.lr",))


def test_a_second_run_on_a_held_workdir_fails_at_once(wordnet_data_dir, tmp_path):
    config = tiny_config(wordnet_data_dir)
    with WorkdirLock(str(tmp_path), process_index=0):
        # Another thread stands in for another process (flock is per open file).
        import threading

        errors = []
        thread = threading.Thread(target=lambda: errors.append(_try_run(config, tmp_path)))
        thread.start()
        thread.join(timeout=120)
    assert len(errors) == 1 and isinstance(errors[0], WorkdirBusyError), errors
    assert f"pid {os.getpid()}" in str(errors[0])
    assert not (tmp_path / "config.json").exists()  # Nothing written.


def _try_run(config, tmp_path):
    try:
        loop.train_and_evaluate(config, str(tmp_path))
    except Exception as error:  # noqa: BLE001 - returned for the assertion.
        return error
    return None


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_falls_back_to_the_step_before(wordnet_data_dir,
                                                                  tmp_path):
    config = tiny_config(wordnet_data_dir, num_steps=6)  # Saves steps 3 and 6.
    loop.train_and_evaluate(config, str(tmp_path))
    step_dir = tmp_path / "checkpoints" / "6"
    data_files = sorted((p for p in step_dir.rglob("*") if p.is_file()
                         and p.stat().st_size > 1000), key=lambda p: -p.stat().st_size)
    with open(data_files[0], "r+b") as f:  # Flip bytes in the biggest file.
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    config.train.num_steps = 7
    results = loop.train_and_evaluate(config, str(tmp_path))
    assert results["step"] == 7
    names = os.listdir(tmp_path / "checkpoints")
    assert any(n.startswith("6.corrupt-") for n in names), names  # Set aside, not deleted.
    with open(tmp_path / "run_history.jsonl") as f:
        assert len(f.readlines()) == 2
    with open(tmp_path / "metrics.jsonl") as f:  # Steps 4..6 were redone from step 3.
        assert [json.loads(line)["step"] for line in f] == list(range(1, 8))
