"""A run's record and result files as a killed run, a restart or a copy leaves them:
a half-written results.json is not a finished trial, a torn metrics.jsonl line neither
breaks the readers nor the plots, a resumed run logs each step once, and a restart keeps
the original config.json and adds a line to the run history."""

import json
import logging
import os
import types

import pytest
from ml_collections import ConfigDict

from train import run_record
from train.experiments import learning_curves, sweep_report, sweeps
from train.metrics_log import MetricsLog, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"
COMPLETE = {"step": 3, "validation": {"accuracy": 0.5}, "test": {"accuracy": 0.4}}


def write_rows(path, steps, tail=""):
    rows = [json.dumps({"step": s, "train/loss": 3.0 / s, "eval/accuracy": 0.1 * s}) + "\n"
            for s in steps]
    path.write_text("".join(rows) + tail)


# --- results.json: complete, or the trial runs again -------------------------------------


@pytest.mark.parametrize("text", ["", json.dumps(COMPLETE)[:25], "[1, 2]"],
                         ids=["empty", "half-written", "not-an-object"])
def test_incomplete_results_is_not_a_finished_trial(tmp_path, text, caplog):
    trial = sweeps.Trial("lr=0.1", {"optim.lr": 0.1}, None)
    (tmp_path / trial.name).mkdir()
    results = tmp_path / trial.name / "results.json"
    results.write_text(text)
    with caplog.at_level(logging.WARNING, logger="strata"):
        assert not sweeps.is_finished(str(tmp_path), trial)
    assert str(results) in caplog.text and "did not finish" in caplog.text
    assert run_record.read_results(str(results)) is None
    assert sweep_report.collect_rows(str(tmp_path), [trial])[0]["status"] == "pending"
    ran = []
    sweeps.run_trials(str(tmp_path), [trial], ran.append)
    assert ran == [trial]  # Runs again instead of being skipped.

    results.write_text(json.dumps(COMPLETE))
    assert sweeps.is_finished(str(tmp_path), trial)
    row = sweep_report.collect_rows(str(tmp_path), [trial])[0]
    assert row["status"] == "done" and row["validation/accuracy"] == 0.5


# --- metrics.jsonl: a torn last line, a resumed run ------------------------------------


def test_reader_skips_a_torn_last_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, [1, 2, 3], tail='{"step": 4, "train/lo')
    with caplog.at_level(logging.WARNING, logger="strata"):
        rows = read_metrics(str(path))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert f"{path}:4" in caplog.text and "torn" in caplog.text
    write_rows(path, [1, 2, 3], tail='{"step": 4}')  # Complete, only no newline yet.
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2, 3, 4]
    assert read_metrics(str(tmp_path / "absent.jsonl")) == []


def test_reader_refuses_a_torn_line_in_the_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_rows(path, [1], tail='{"step": 2, "tra\n' + json.dumps({"step": 3}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: invalid JSON"):
        read_metrics(str(path))


def test_plots_skip_a_torn_last_line(tmp_path):
    trial = tmp_path / "lr=0.1"
    trial.mkdir()
    write_rows(trial / "metrics.jsonl", [1, 2, 3], tail='{"step": 4, "eval/accur')
    png = learning_curves.write_learning_curves(str(trial))
    assert open(png, "rb").read()[:8] == PNG
    spec = types.SimpleNamespace(metric="validation/accuracy")
    path = sweep_report.plot_learning_curves(
        str(tmp_path / "curves.png"), str(tmp_path), [("lr=0.1", None, None, ["lr=0.1"])],
        spec)
    assert open(path, "rb").read()[:8] == PNG


def test_resumed_metrics_log_has_one_row_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    # The killed run logged steps 5..25 and was torn writing step 30; it saved step 20.
    write_rows(path, [5, 10, 15, 20, 25], tail='{"step": 30, "train/l')
    log = MetricsLog(str(tmp_path), total_steps=40, start_step=20, progress=False)
    for step in (25, 30, 35, 40):
        log.write(step, {"train/loss": 1.0 / step})
    log.close()
    steps = [r["step"] for r in read_metrics(str(path))]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
    assert path.read_text().endswith("\n")
    # The rows kept are the killed run's own; the rest are the resumed run's.
    by_step = {r["step"]: r for r in read_metrics(str(path))}
    assert by_step[20]["train/loss"] == 3.0 / 20 and by_step[25]["train/loss"] == 1.0 / 25


def test_restart_from_scratch_drops_the_killed_runs_rows(tmp_path):
    write_rows(tmp_path / "metrics.jsonl", [5, 10])  # Killed before its first checkpoint.
    log = MetricsLog(str(tmp_path), total_steps=10, start_step=0, progress=False)
    log.write(5, {"train/loss": 0.5})
    log.close()
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [5]


# --- config.json, run.json and the run history ----------------------------------------


def test_restart_keeps_the_record_and_appends_to_the_history(tmp_path):
    first = ConfigDict({"seed": 0, "train": {"num_steps": 10}})
    run_record.write_run_record(str(tmp_path), first)
    run_record.append_run_history(str(tmp_path), first, {})
    run_json = (tmp_path / "run.json").read_text()

    second = ConfigDict({"seed": 0, "train": {"num_steps": 20}})
    run_record.write_run_record(str(tmp_path), second)
    changes = {"train.num_steps": [10, 20]}
    run_record.append_run_history(str(tmp_path), second, changes)

    assert run_record.read_recorded_config(str(tmp_path)) == first.to_dict()
    assert (tmp_path / "run.json").read_text() == run_json
    history = [json.loads(line) for line in open(tmp_path / "run_history.jsonl")]
    assert len(history) == 2
    assert history[0]["changes"] == {} and history[1]["changes"] == changes
    for entry in history:
        assert {"time", "host", "argv", "code"} <= set(entry)
    assert history[0]["config_sha256"] != history[1]["config_sha256"]


def test_recorded_config_of_a_new_or_damaged_workdir(tmp_path):
    assert run_record.read_recorded_config(str(tmp_path)) is None
    (tmp_path / "config.json").write_text('{"seed": ')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        run_record.read_recorded_config(str(tmp_path))


def test_workdir_that_is_a_file(tmp_path):
    run_record.check_workdir(str(tmp_path))  # A previous run's directory.
    run_record.check_workdir(str(tmp_path / "new" / "run"))  # A new one.
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    with pytest.raises(NotADirectoryError,
                       match=f"--workdir {existing} is a file; expected a directory"):
        run_record.check_workdir(str(existing))
    with pytest.raises(NotADirectoryError, match=f"{existing} is a file"):
        run_record.check_workdir(str(existing / "run"))
    assert os.path.isfile(existing)
