"""Early stopping (config.train.early_stopping_patience): a run whose validation metric
stops improving stops where the rule, applied to the metrics it logged, says; its results
are the best checkpoint's; a preempted run resumes to that same stop (its count replayed
from metrics.jsonl, also after the stop); bad settings fail at start-up naming the
key."""

import json
import os
import signal

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import scratch
from train import config_checks, loop
from train import trainer as trainer_lib

PATIENCE, MIN_DELTA, CAP = 2, 0.0, 20


def tiny_config(data_dir, **train):
    """Evaluates every 2 steps on one batch; saves only where early stopping needs to
    (a checkpoint costs seconds on 8 fake devices)."""
    config = scratch.get_config("runlocal")
    config.data.data_dir = str(data_dir)
    config.data.batch_size = 8
    config.train.update(dict(
        num_steps=CAP, log_every=2, eval_every=2, eval_steps=1, final_eval_steps=1,
        checkpoint_every=1000, progress=False, best_metric="eval/accuracy",
        best_mode="max", early_stopping_patience=PATIENCE,
        early_stopping_min_delta=MIN_DELTA), **train)
    return config


def eval_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "eval/accuracy" in r]


def rule(rows, patience=PATIENCE, min_delta=MIN_DELTA):
    """-> (stop step or None, best step, evaluations since the best): the first
    evaluation after which accuracy has not risen by more than min_delta for `patience`
    evaluations, from the logged rows."""
    best, best_step, waited = -np.inf, None, 0
    for row in rows:
        if row["eval/accuracy"] > best + min_delta:
            best, best_step, waited = row["eval/accuracy"], row["step"], 0
        else:
            waited += 1
            if waited >= patience:
                return row["step"], best_step, waited
    return None, best_step, waited


@pytest.mark.slow
def test_a_resumed_run_stops_where_its_logged_metric_says_on_the_best_checkpoint(
        wordnet_data_dir, tmp_path, monkeypatch):
    """Preempted once the log shows a rise and then an evaluation without one: the
    resumed run must replay that count from metrics.jsonl to stop where the rule says
    (losing it would stop later; counting twice, earlier)."""
    config = tiny_config(wordnet_data_dir)
    preempted = []

    def preempt_once_waiting(phase, step):
        if phase == "after_step" and not preempted and step % 2:  # Between evaluations.
            rows = eval_rows(tmp_path)
            stop, best_step, waited = rule(rows)
            if stop is None and waited and best_step > rows[0]["step"]:
                preempted.append(step)
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop, "TEST_HOOK", preempt_once_waiting)
    assert loop.train_and_evaluate(config, str(tmp_path)) == {
        "preempted_at_step": preempted[0]}
    monkeypatch.setattr(loop, "TEST_HOOK", None)
    results = loop.train_and_evaluate(config, str(tmp_path))
    rows = eval_rows(tmp_path)
    stop, best_step, _ = rule(rows)
    assert stop is not None and best_step < preempted[0] < stop
    assert results["stopped_early_at_step"] == results["step"] == stop < CAP
    assert results["best_step"] == best_step and results["evaluations"] == len(rows)
    assert rows[-1]["step"] == stop  # Nothing trained past the stop.
    assert os.listdir(tmp_path / "best") == [str(best_step)]
    assert json.load(open(tmp_path / "results.json"))["best_step"] == best_step
    # Validation is the best step's evaluation (the same single batch) ...
    at_best = next(r for r in rows if r["step"] == best_step)
    assert results["validation"] == pytest.approx(
        {k.removeprefix("eval/"): v for k, v in at_best.items() if k.startswith("eval/")})
    # ... and test is what the best checkpoint's parameters score, evaluated here.
    data = loop.load_data(config)
    trainer = trainer_lib.build_trainer(config, train_source=data.train_source)
    manager = ocp.CheckpointManager(str(tmp_path / "best"), item_names=("state", "data"))
    restored = manager.restore(best_step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(trainer.abstract_state()),
        data=ocp.args.JsonRestore()))
    manager.close()
    test = trainer.evaluate(restored.state.params, data.eval_batches("test"), 1)
    assert results["test"] == pytest.approx({k: float(v) for k, v in test.items()})


def test_the_state_is_replayed_from_the_metrics_log(tmp_path):
    """min mode with min_delta: 2.45 and 2.44 are within 0.1 of the best 2.5, so they
    count as evaluations without improvement; a resume at 50 is past the stop."""
    losses = [(10, 3.0), (20, 2.5), (30, 2.45), (40, "NaN"), (50, 2.44), (60, 1.0)]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step, loss in losses:
            f.write(json.dumps({"step": step - 5, "train/loss": 1.0}) + "\n")  # Logs only.
            f.write(json.dumps({"step": step, "eval/loss": loss}) + "\n")
    train = tiny_config(tmp_path, best_metric="eval/loss", best_mode="min",
                        early_stopping_patience=3, early_stopping_min_delta=0.1).train
    before = loop.EarlyStopping.resumed(train, str(tmp_path), 40)
    assert (before.best_step, before.since_best, before.evaluations) == (20, 2, 4)
    assert not before.stopped()
    assert before.observe(50, {"eval/loss": 2.44}) == (False, True)
    after = loop.EarlyStopping.resumed(train, str(tmp_path), 50)  # 60 is not replayed.
    assert (after.best_step, after.evaluations) == (20, 5) and after.stopped()
    train.early_stopping_patience = 0  # Off: every evaluation goes to best/, no stop.
    off = loop.EarlyStopping.resumed(train, str(tmp_path), 60)
    assert not off.stopped() and off.observe(70, {}) == (True, False)


def test_bad_early_stopping_settings_fail_at_start_up_naming_the_key(tmp_path):
    config = tiny_config(tmp_path)
    config_checks.validate(config)
    for train, message in [
            (dict(early_stopping_patience=-1), "config.train.early_stopping_patience=-1"),
            (dict(early_stopping_min_delta=-0.1),
             "config.train.early_stopping_min_delta=-0.1"),
            (dict(best_metric=""), "config.train.early_stopping_patience=2 watches "
                                   "config.train.best_metric, which is empty")]:
        bad = tiny_config(tmp_path, **train)
        with pytest.raises(ValueError, match=message):
            config_checks.validate(bad)
        with pytest.raises(ValueError, match=message):  # Before anything is written.
            loop.train_and_evaluate(bad, str(tmp_path / "run"))
        assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"counts evaluations, but config.train.eval_every=0"):
        loop.check_early_stopping(tiny_config(tmp_path, eval_every=0).train)
    config_checks.validate(tiny_config(tmp_path, best_metric="", early_stopping_patience=0))
