"""The one train loop every stage runs: config -> task data -> trainer -> steps ->
checkpoints -> final evaluation.

`train_and_evaluate` reads as the story of a run (build, restore or init, the loop, the
final evaluation); each piece it calls has one job. Side effects (I/O, logging,
checkpoints, signals) live here; the steps, losses and model are pure.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from train import checkpoints as ckpt
from train import memory, run_record, tasks
from train import trainer as trainer_lib
from train.forgetting import measure_forgetting
from train.metrics_log import MetricsLog, read_metrics
from train.resume_check import check_resume
from train.run_files import atomic_write_json, write_results
from train.workdir_lock import WorkdirLock

log = logging.getLogger("strata")


class NonFiniteLossError(FloatingPointError):
    pass


def dry_run(config, workdir):
    """Build model and optimizer abstractly; write `params.json`; allocate nothing. A
    task whose runner compiles its own step adds that step's facts (`describe_step`)."""
    setup = trainer_lib.abstract_setup(config)
    counts = {**setup.counts, **tasks.get_task(config.task).describe_step(config, setup)}
    atomic_write_json(os.path.join(workdir, "params.json"), counts)
    return counts


# --- Data --------------------------------------------------------------------------------

@dataclasses.dataclass
class RunData:
    """The task's sources, tokenizer and train iterator; eval splits opened once."""

    task: tasks.Task
    data_cfg: object
    train_source: object
    tokenizer: object
    train_iter: object
    eval_sources: dict

    def eval_batches(self, split):
        return self.task.eval_iterator(self.eval_sources[split], self.tokenizer,
                                       self.data_cfg)

    def report(self):
        """What the run trained on, for results.json: the labelled examples used."""
        d = self.data_cfg
        return {"label_fraction": float(d.label_fraction),
                "train_examples": len(self.train_source), "sampling": d.sampling,
                "token_dropout": float(d.token_dropout),
                "token_substitution": float(d.token_substitution)}


def load_data(config) -> RunData:
    task, data_cfg = tasks.loop_task(config.task), config.data
    if jax.process_count() > 1 and task.prepared_corpus:
        # Process 0 builds the dataset and tokenizer once; the others then only read.
        if jax.process_index() == 0:
            task.prepare_data(data_cfg)
        multihost_utils.sync_global_devices("strata: data prepared")
    train_source = task.load_split(data_cfg, data_cfg.train_split)
    task.check_source(config, train_source, data_cfg.train_split)
    tok = task.tokenizer(data_cfg)
    if tok is not None and tok.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"The tokenizer has {tok.vocab_size} pieces but config.model.vocab_size="
            f"{config.model.vocab_size}; set it to at least the tokenizer's size")
    train_iter = task.train_iterator(train_source, tok, data_cfg, config.seed)
    eval_sources = {split: task.load_split(data_cfg, split)
                    for split in (data_cfg.eval_split, data_cfg.test_split)}
    for split, source in eval_sources.items():
        task.check_source(config, source, split)
    return RunData(task, data_cfg, train_source, tok, train_iter, eval_sources)


# --- State -------------------------------------------------------------------------------

def restore_or_init(trainer, checkpoints, data, config, workdir):
    """-> (state, first step): the latest checkpoint (state and data position), or a
    fresh state with config.init_from's parameters loaded over it."""
    # The newest intact step: a corrupt or incomplete one is set aside, never deleted.
    restored = checkpoints.restore_latest_intact(trainer.abstract_state())
    if restored is not None:
        start_step, state, data_state = restored
        data.train_iter.set_state(data_state)
        log.info("Resumed from step %d in %s", start_step, workdir)
        return state, start_step
    if not config.init_from:
        return trainer.init_state(), 0
    # Optimizer state starts fresh on the loaded params: the regulariser's anchor
    # (optim.regularize_toward="init") is what the run starts from, not the init.
    state, init_report = trainer.init_state_from(config.init_from)
    if jax.process_index() == 0:
        atomic_write_json(os.path.join(workdir, "init_from.json"), init_report)
    return state, 0


# --- Pieces of the loop ------------------------------------------------------------------

class TrainClock:
    """Training seconds across restarts: each checkpoint's step records the seconds of
    every invocation that led to it (W/train_time.json), so a resumed run reports the
    time its result cost, not only its last invocation's. A resume from a step the file
    does not know (a run started by an older code version) counts that past as unknown."""

    FILE = "train_time.json"

    def __init__(self, workdir, start_step):
        self.path = os.path.join(workdir, self.FILE)
        self.by_step = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.by_step = json.load(f)
        self.before = self.by_step.get(str(start_step), [] if start_step == 0 else [None])
        self.start = time.perf_counter()

    def segments(self):
        """Seconds of each invocation so far, this one last (None: not recorded)."""
        return [*self.before, time.perf_counter() - self.start]

    def saved(self, step):
        """The checkpoint of `step` holds the training so far."""
        self.by_step[str(step)] = self.segments()
        if jax.process_index() == 0:
            atomic_write_json(self.path, self.by_step)

    def report(self):
        segments = self.segments()
        return {"train_time_s": sum(s for s in segments if s is not None),
                "train_time_segments_s": segments}


class Preemption:
    """SIGTERM (a TPU preemption, `scancel`) or orbax's preemption notice. The loop asks
    once per step, so the step it saves is the step it says it saved."""

    def __init__(self, checkpoints):
        self.checkpoints, self.signalled = checkpoints, False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, *_):
        self.signalled = True

    def __exit__(self, *_):
        signal.signal(signal.SIGTERM, self.previous)

    def requested(self, step):
        return self.signalled or self.checkpoints.reached_preemption(step)


def check_early_stopping(train_cfg):
    """Start-up check of config.train.early_stopping_* (also run by config_checks)."""
    patience, min_delta = train_cfg.early_stopping_patience, train_cfg.early_stopping_min_delta
    if patience < 0:
        raise ValueError(f"config.train.early_stopping_patience={patience} must be >= 0 "
                         f"(0: train all config.train.num_steps)")
    if min_delta < 0:
        raise ValueError(f"config.train.early_stopping_min_delta={min_delta} must be >= 0")
    if patience and not train_cfg.best_metric:
        raise ValueError(f"config.train.early_stopping_patience={patience} watches "
                         f"config.train.best_metric, which is empty; name an eval metric "
                         f"(e.g. 'eval/accuracy') or set the patience to 0")
    if patience and train_cfg.eval_every < 1:
        raise ValueError(f"config.train.early_stopping_patience={patience} counts "
                         f"evaluations, but config.train.eval_every={train_cfg.eval_every}; "
                         f"set it to >= 1")
    if patience and train_cfg.best_mode not in ("min", "max"):
        raise ValueError(f"config.train.best_mode={train_cfg.best_mode!r}; early stopping "
                         f"needs 'min' or 'max'")


class EarlyStopping:
    """config.train.early_stopping_patience = N > 0: training stops at the evaluation
    after which config.train.best_metric has not improved (by more than
    early_stopping_min_delta, in best_mode's direction) for N consecutive evaluations;
    config.train.num_steps stays the cap. Only improving evaluations are saved to
    `best/`, so its step is the rule's best step, and the final evaluation is of it.

    The state is the run's own eval history, replayed from metrics.jsonl on a resume
    (the rows up to the restored step), so a resumed run stops where an uninterrupted
    one does. Process 0 holds it (it alone writes metrics.jsonl); its decisions are
    broadcast, one value all processes act on (as Preemption's is one per step).
    Patience 0: off, and every evaluation goes to orbax's best manager as before.
    """

    def __init__(self, train_cfg, history=()):
        self.patience = train_cfg.early_stopping_patience
        self.min_delta = train_cfg.early_stopping_min_delta
        self.metric, self.mode = train_cfg.best_metric, train_cfg.best_mode
        self.best_step = self.best_value = None
        self.evaluations = self.since_best = 0
        for step, value in history:
            self._observe(step, value)

    @classmethod
    def resumed(cls, train_cfg, workdir, start_step):
        """The state after the evaluations metrics.jsonl recorded up to `start_step`."""
        history = []
        if train_cfg.early_stopping_patience and jax.process_index() == 0:
            metric = train_cfg.best_metric
            history = [(row["step"], float(row[metric]))
                       for row in read_metrics(os.path.join(workdir, "metrics.jsonl"))
                       if row["step"] <= start_step and metric in row]
        return cls(train_cfg, history)

    @property
    def enabled(self):
        return self.patience > 0

    def _improves(self, value):
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        gain = value - self.best_value if self.mode == "max" else self.best_value - value
        return gain > self.min_delta

    def _observe(self, step, value):
        self.evaluations += 1
        if self._improves(value):
            self.best_step, self.best_value, self.since_best = step, value, 0
            return True
        self.since_best += 1
        return False

    def _stop(self):
        return self.enabled and self.since_best >= self.patience

    def stopped(self):
        """Whether the recorded history already says stop (a resume after the stop)."""
        return _agreed(self._stop())

    def observe(self, step, eval_metrics):
        """-> (save this evaluation to best/, stop now), agreed by all processes."""
        if not self.enabled:
            return True, False
        if self.metric not in eval_metrics:
            raise KeyError(f"config.train.best_metric={self.metric!r} is not among the "
                           f"eval metrics {sorted(eval_metrics)}")
        improved = self._observe(step, float(eval_metrics[self.metric]))
        code = _agreed(int(improved) | int(self._stop()) << 1)
        return bool(code & 1), bool(code & 2)

    def report(self, stopped_at, best_step):
        """results.json's fields: the step it stopped at (None: it ran to the cap), the
        evaluated best step, and how many evaluations the history holds."""
        return {"stopped_early_at_step": stopped_at, "best_step": best_step,
                "evaluations": self.evaluations}


def _agreed(value):
    """Process 0's int `value` on every process (one value all of them act on)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(
        np.int32(value if jax.process_index() == 0 else 0)))


@dataclasses.dataclass
class Cadence:
    """Which steps log, evaluate and save (config.train)."""

    num_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int

    def is_eval(self, step):
        return step == self.num_steps or step % self.eval_every == 0

    def is_save(self, step):
        return step == self.num_steps or step % self.checkpoint_every == 0

    def is_log(self, step):
        return step % self.log_every == 0


class Throughput:
    """Train metrics summed between log steps, with tokens and wall time."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.steps, self.tokens, self.real_tokens = None, 0, 0, 0
        self.start = time.perf_counter()

    def add(self, metrics, tokens, real_tokens):
        self.sums = metrics if self.sums is None else jax.tree_util.tree_map(
            lambda a, b: a + b, self.sums, metrics)
        self.steps += 1
        self.tokens += tokens
        self.real_tokens += real_tokens

    def record(self, trainer, last_metrics):
        """{"train/...": means, learning rate, tokens/s, steps/s, MFU}; syncs the device."""
        averaged = {k: float(v) / self.steps for k, v in self.sums.items()}
        nonfinite = averaged.pop("nonfinite") or not np.isfinite(averaged["loss"])
        elapsed = time.perf_counter() - self.start
        record = {f"train/{k}": v for k, v in averaged.items()}
        record["train/learning_rate"] = float(last_metrics["learning_rate"])
        record["tokens_per_s"] = self.tokens / elapsed
        record["real_tokens_per_s"] = self.real_tokens / elapsed
        record["steps_per_s"] = self.steps / elapsed
        record["mfu"] = trainer.mfu(record["tokens_per_s"])
        return record, nonfinite


def final_results(trainer, data, state, config, step, train_time, compiled):
    results = {"step": step, **train_time, "parameters": trainer.counts,
               "data": data.report()}
    if compiled:  # The widest batch's executable: the run's peak.
        results["peak_memory"] = memory.peak_memory(compiled[max(compiled, key=lambda s: s[1])])
    for split in (config.data.eval_split, config.data.test_split):
        results[split] = trainer.evaluate(state.params, data.eval_batches(split),
                                          config.train.final_eval_steps)
    if config.train.report_forgetting and data.task.measures_forgetting:
        forgetting = measure_forgetting(config, state.params, data.tokenizer, trainer.mesh,
                                        trainer.rules)
        if forgetting is not None:
            results["forgetting"] = forgetting
    return results


# --- The run -----------------------------------------------------------------------------

def train_and_evaluate(config, workdir, allow_config_change=(), results_file=True):
    """Trains `config` in `workdir` (resuming from its latest checkpoint); returns results,
    or {"preempted_at_step": step} after saving on preemption (no results.json).

    One run owns the workdir while it trains (`W/.lock`). Everything is checked (config,
    data, mesh, and on a restart the config against the recorded one) before the first
    write. `allow_config_change`: fields a restart may change beyond the safe ones
    (train/resume_check.py). `results_file=False`: a runner with phases after training
    writes results.json itself, once they are done (it marks the run finished)."""
    check_early_stopping(config.train)
    with WorkdirLock(workdir):
        data = load_data(config)
        trainer = trainer_lib.build_trainer(config, train_source=data.train_source)
        changes = check_resume(run_record.read_recorded_config(workdir), config.to_dict(),
                               workdir, allow_config_change)
        for field, (old, new) in changes.items():
            log.warning("Restart with config.%s changed: %r -> %r", field, old, new)
        run_record.write_run_record(workdir, config)  # The first start's record stays.
        run_record.append_run_history(workdir, config, changes)
        log.info("Mesh %s over %d devices (%s); parameters: %s total, %s trainable",
                 dict(trainer.mesh.shape), trainer.mesh.size, jax.devices()[0].device_kind,
                 f"{trainer.counts['total']:,}", f"{trainer.counts['trainable']:,}")
        return train(config, workdir, data, trainer, results_file)


def train(config, workdir, data, trainer, results_file=True):
    """The loop: restore or init, steps, logs, evaluations, checkpoints; then the final
    evaluation and results.json (the file that marks the run finished). With early
    stopping, the loop may end before num_steps, and the final evaluation is of the
    best checkpoint's parameters."""
    checkpoints = ckpt.Checkpoints(workdir, config.train)
    train_cfg, num_steps = config.train, config.train.num_steps
    cadence = Cadence(num_steps, train_cfg.log_every, train_cfg.eval_every,
                      train_cfg.checkpoint_every)
    state, step = restore_or_init(trainer, checkpoints, data, config, workdir)
    early_stopping = EarlyStopping.resumed(train_cfg, workdir, step)
    stopped = early_stopping.stopped()  # Resumed after the stop: nothing left to train.
    stopped_at = step if stopped and step < num_steps else None
    metrics_log = MetricsLog(workdir, num_steps, step, train_cfg.progress)
    # One executable per batch shape: with config.data.length_buckets the width varies
    # among a few fixed values, each compiled once.
    throughput, compiled, best_step = Throughput(), {}, None
    clock = TrainClock(workdir, step)
    try:
        with Preemption(checkpoints) as preemption:
            while step < num_steps and not stopped:
                local = next(data.train_iter)
                batch = trainer.global_batch(local)
                shape = local[data.task.input_field].shape
                if shape not in compiled:  # Compiled ahead once a shape: XLA's memory figure.
                    compiled[shape] = trainer.compile_train_step(state, batch)
                with trainer.context():
                    state, metrics = compiled[shape](state, batch)
                step += 1
                throughput.add(metrics, *data.task.count_tokens(local))
                _test_hook("after_step", step)

                preempted = preemption.requested(step)  # The one decision this step.
                _test_hook("after_decision", step)
                is_eval, is_save = cadence.is_eval(step), cadence.is_save(step) or preempted
                keep_best = False
                if cadence.is_log(step) or is_eval or is_save:
                    record, nonfinite = throughput.record(trainer, metrics)
                    if nonfinite:
                        raise NonFiniteLossError(
                            f"Non-finite training loss or update by step {step}; stopping "
                            f"without saving. The last good checkpoint is step "
                            f"{checkpoints.latest_step()} in {workdir}. Lower "
                            f"config.optim.lr or check the data.")
                    if is_eval:
                        eval_metrics = {f"eval/{k}": v for k, v in trainer.evaluate(
                            state.params, data.eval_batches(config.data.eval_split),
                            train_cfg.eval_steps).items()}
                        record.update(eval_metrics)
                        keep_best, stopped = early_stopping.observe(step, eval_metrics)
                        stopped_at = step if stopped and step < num_steps else None
                        is_save = is_save or stopped
                    _test_hook("after_eval", step)
                    metrics_log.write(step, record)
                    eta = (num_steps - step) / max(record["steps_per_s"], 1e-9)
                    metrics_log.progress(step, {"loss": f"{record['train/loss']:.4f}",
                                                "tok/s": f"{record['tokens_per_s']:,.0f}",
                                                "eta": f"{eta:,.0f}s"})
                    throughput.reset()
                    if is_save:
                        checkpoints.save(step, state, data.train_iter.get_state(),
                                         force=True)
                        clock.saved(step)
                        _test_hook("after_save", step)
                    if keep_best:
                        checkpoints.save_best(step, state, data.train_iter.get_state(),
                                              eval_metrics)
                if preempted:
                    checkpoints.wait()
                    log.warning("Preempted at step %d: checkpoint saved, exiting.", step)
                    return {"preempted_at_step": step}
        if stopped_at is not None:
            log.info("Early stopping at step %d: %s has not improved by more than %g in "
                     "%d evaluations; the final evaluation is of the best checkpoint.",
                     stopped_at, train_cfg.best_metric, early_stopping.min_delta,
                     early_stopping.patience)
        if early_stopping.enabled:  # The final evaluation is of the best checkpoint.
            checkpoints.wait()
            state = None  # The last state's memory, freed before the best one is read.
            best = checkpoints.restore_best(trainer.abstract_state())
            if best is None:
                raise RuntimeError(
                    f"Early stopping found no checkpoint in {workdir}/best: no evaluation "
                    f"of config.train.best_metric={train_cfg.best_metric!r} was finite")
            best_step, state, _ = best
    finally:
        checkpoints.wait()
        checkpoints.close()
        metrics_log.close()

    results = final_results(trainer, data, state, config, step, clock.report(), compiled)
    if early_stopping.enabled:
        results.update(early_stopping.report(stopped_at, best_step))
    return write_results(workdir, results) if results_file else results


# Tests deliver signals at exact points of a step through this (phase, step) callback.
TEST_HOOK = None


def _test_hook(phase, step):
    if TEST_HOOK is not None:
        TEST_HOOK(phase, step)
