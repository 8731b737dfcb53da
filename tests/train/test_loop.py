"""The train loop end to end on WordNet: training from scratch, metrics, results, dry run,
resume (SIGKILL and SIGTERM), a different mesh on restore, non-finite loss."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import scratch
from launch import run_task
from train import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def runlocal_config(data_dir, **train):
    config = scratch.get_config("runlocal")
    config.data.data_dir = str(data_dir)
    config.train.progress = False
    config.train.final_eval_steps = 8  # 512 examples a split: whole splits take minutes.
    config.train.update(train)
    return config


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_scratch_runlocal_end_to_end(wordnet_data_dir, tmp_path):
    config = runlocal_config(wordnet_data_dir, num_steps=60, eval_every=30, log_every=10)
    results = run_task.run(config, str(tmp_path))  # What launch.main runs: loop + plots.
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    first, last = records[0]["train/loss"], records[-1]["train/loss"]
    assert last < first - 0.2, (first, last)  # Learning, from ln(45) ~ 3.8.
    for key in ("train/learning_rate", "tokens_per_s", "mfu", "steps_per_s"):
        assert records[-1][key] > 0, key
    assert "eval/accuracy" in records[2] and "eval/macro_f1" in records[-1]
    saved = json.load(open(tmp_path / "results.json"))
    assert saved == json.loads(json.dumps(results))
    for split in ("validation", "test"):
        assert 0.0 <= saved[split]["macro_f1"] <= saved[split]["accuracy"] + 0.5
        # Better than always predicting the majority class would be at this budget?
        # Not guaranteed for 60 tiny steps; assert it beats uniform guessing instead.
        assert saved[split]["accuracy"] > 1 / 45
    run = json.load(open(tmp_path / "run.json"))
    assert run["environment"]["jax"] == jax.__version__ and "git_commit" in run["code"]
    assert json.load(open(tmp_path / "config.json"))["task"] == "classify"
    assert os.listdir(tmp_path / "tensorboard")
    with open(tmp_path / "learning_curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["30", "60"]
    assert os.listdir(tmp_path / "best") in (["30"], ["60"])


def launch_main(workdir, data_dir, *overrides, config="configs/scratch.py:runlocal",
                compile_cache=True):
    """Starts a training process; its output goes to `<workdir>.log` (a pipe could fill
    up and block it). A process that will be SIGKILLed gets `compile_cache=False`: killed
    mid-write it would leave a truncated entry in the shared cache (root conftest.py)."""
    log = open(f"{workdir}.log", "w")
    env = dict(os.environ)
    if not compile_cache:
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "launch.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}", "--config.train.progress=False", *overrides],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    process.log_path = f"{workdir}.log"
    return process


def output_of(process):
    with open(process.log_path) as f:
        return f.read()


def final_params(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    item_names=("state", "data"))
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
    manager.close()
    return step, jax.tree_util.tree_leaves(restored.state["params"])


def wait_for_checkpoint(workdir, step, process, timeout=240):
    path = os.path.join(workdir, "checkpoints", str(step))
    deadline = time.time() + timeout
    while not os.path.isdir(path):
        assert process.poll() is None, output_of(process)
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)


RESUME = ("--config.train.num_steps=40", "--config.train.checkpoint_every=10",
          "--config.train.eval_every=20", "--config.train.log_every=5",
          "--config.train.final_eval_steps=4")  # Not the whole splits: seconds, not minutes.


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(wordnet_data_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run = launch_main(straight, wordnet_data_dir, *RESUME)
    assert run.wait() == 0, output_of(run)

    victim = launch_main(killed, wordnet_data_dir, *RESUME, compile_cache=False)
    wait_for_checkpoint(killed, 20, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not os.path.exists(killed / "results.json")
    resumed = launch_main(killed, wordnet_data_dir, *RESUME)
    assert resumed.wait() == 0, output_of(resumed)
    output = output_of(resumed)
    assert "Resumed from step" in output

    step_a, params_a = final_params(str(straight))
    step_b, params_b = final_params(str(killed))
    assert step_a == step_b == 40
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(a, b)  # Bitwise on CPU.
    results_a = json.load(open(straight / "results.json"))
    results_b = json.load(open(killed / "results.json"))
    for split in ("validation", "test"):
        assert results_a[split] == results_b[split]
    # The resumed run's logged training metrics after the restart equal the straight run's.
    by_step = {r["step"]: r for r in read_jsonl(straight / "metrics.jsonl")}
    for record in read_jsonl(killed / "metrics.jsonl"):
        if record["step"] > 20:
            assert record["train/loss"] == by_step[record["step"]]["train/loss"]


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(wordnet_data_dir, tmp_path):
    run = launch_main(tmp_path, wordnet_data_dir, "--config.train.num_steps=100000",
                      "--config.train.checkpoint_every=100000")
    wait_for_metrics = time.time() + 240
    metrics = tmp_path / "metrics.jsonl"
    while not (metrics.exists() and metrics.stat().st_size):  # Training has started.
        assert run.poll() is None and time.time() < wait_for_metrics, output_of(run)
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == run_task.PREEMPTED_EXIT_CODE, output_of(run)
    output = output_of(run)
    assert "Preempted at step" in output
    steps = os.listdir(tmp_path / "checkpoints")
    assert len(steps) == 1 and int(steps[0]) >= 10


@pytest.mark.slow
def test_restore_onto_a_different_mesh(wordnet_data_dir, tmp_path):
    config = runlocal_config(wordnet_data_dir, num_steps=20, eval_every=20,
                             checkpoint_every=10)
    config.mesh.update(dict(data=8, fsdp=1, tensor=1))
    loop.train_and_evaluate(config, str(tmp_path))
    _, saved = final_params(str(tmp_path))
    # Continue on an fsdp x tensor mesh: restores at step 20 and trains 10 more steps.
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    config.train.num_steps = 30
    results = loop.train_and_evaluate(config, str(tmp_path))
    assert results["step"] == 30
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert steps[-1] == 30 and 20 in steps
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"), item_names=("state", "data"))
    at_20 = manager.restore(20, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
    manager.close()
    for a, b in zip(saved, jax.tree_util.tree_leaves(at_20.state["params"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(wordnet_data_dir, tmp_path):
    config = runlocal_config(wordnet_data_dir, num_steps=60, checkpoint_every=5,
                             log_every=5, eval_every=1000)
    config.optim.update(dict(lr=1e12, clip_norm=0.0, warmup_steps=1, weight_decay=0.0))
    with pytest.raises(loop.NonFiniteLossError, match="Non-finite training loss"):
        loop.train_and_evaluate(config, str(tmp_path))
    checkpoints = os.path.join(tmp_path, "checkpoints")
    for step in os.listdir(checkpoints):
        manager = ocp.CheckpointManager(checkpoints, item_names=("state", "data"))
        state = manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())).state
        manager.close()
        assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state["params"]))


def test_dry_run_counts_bert_base_without_allocating(tmp_path):
    config = scratch.get_config("size=base")
    counts = loop.dry_run(config, str(tmp_path))
    encoder = sum(v for k, v in counts["by_module"].items() if k.startswith("encoder/"))
    assert encoder == 108_891_648  # BERT-base without pooler and heads.
    head = counts["by_module"]["classify_head"]
    assert head == 768 * 768 + 768 + 768 * 45 + 45  # Pooler + 45-way classifier.
    assert counts["total"] == encoder + head == counts["trainable"]
    assert json.load(open(tmp_path / "params.json")) == counts
