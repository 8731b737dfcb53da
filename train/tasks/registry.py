"""The task registry: `config.task` names one registered `Task`, and everything that
depends on the task (data, objective, abstract batch, checks, token counting, a runner
around the loop) asks it. Adding a task is one module and one `register` call."""

from __future__ import annotations

import jax
import numpy as np

from train.data import sources, tokenizer

_TASKS: dict[str, Task] = {}


class Task:
    """A supervised or self-supervised objective over text, as the loop trains it.

    Subclasses override what differs; the defaults are classification's text pipeline.
    """

    name = ""
    # "module:function" run around the loop by the entry points (`launch/tasks_run.py`):
    # multi-phase stages (an index, pairs, evaluation after training). "" = the loop alone.
    runner = ""
    # The task whose data and objective the loop trains, when not this one (rag -> the
    # generator's prefix_lm); its checks and abstract batch are that task's.
    loop_task = ""
    # (token field, segment-id field) pairs counted for tokens/s.
    token_fields = (("tokens", "segment_ids"),)
    # Whether the data is a tfds corpus built once by process 0 on multi-host (else
    # examples a runner wrote, which every process reads).
    prepared_corpus = True
    # results.json's "forgetting" (train/forgetting.py) applies: a fine-tuned encoder.
    measures_forgetting = False
    # data.prefix_lm_fraction > 0 (UniLM's prefix-LM rows) is honoured.
    mixes_prefix_lm = False
    # The batch field the model reads as its input (train/steps.py `model_rows`).
    input_field = "tokens"

    def tokenizer(self, data_cfg):
        """The tokenizer the iterators take; None when the input is not text (images)."""
        return tokenizer.get_tokenizer(data_cfg)

    # --- Checks -------------------------------------------------------------------------
    def check(self, config) -> None:
        """Raises ValueError naming the config key when `config` cannot run this task."""

    # --- Data ---------------------------------------------------------------------------
    def load_split(self, data_cfg, split):
        return sources.load_split(data_cfg, split)

    def check_source(self, config, source, split) -> None:
        """Raises ValueError, naming the file or dataset, when a loaded split cannot be
        trained or evaluated under `config` (e.g. labels beyond num_classes)."""

    def prepare_data(self, data_cfg) -> None:
        """Builds the dataset and tokenizer (process 0 first, on multi-host)."""
        if self.prepared_corpus:
            sources.load_split(data_cfg, data_cfg.train_split)
            tokenizer.get_tokenizer(data_cfg)

    def train_iterator(self, source, tok, data_cfg, seed):
        raise NotImplementedError

    def eval_iterator(self, source, tok, data_cfg):
        raise NotImplementedError

    # --- Objective and shapes -----------------------------------------------------------
    def objective(self, config, train_source=None):
        """The objective (train/objectives.py); `train_source` None: shapes only (AOT)."""
        raise NotImplementedError

    def batch_fields(self, config, rows):
        """{field: (shape, dtype)} of a batch of `rows` rows, as the iterators yield."""
        length = config.data.seq_len
        return {"tokens": ((rows, length), "int32"),
                "segment_ids": ((rows, length), "int32"),
                "positions": ((rows, length), "int32"),
                "example_weight": ((rows,), "float32")}

    # --- The step a run trains with (--dry_run, --compile_only) -------------------------
    def step_to_compile(self, config, devices):
        """A runner's own compiled step (GRPO's and DPO's update) as a train/aot.py
        `StepToCompile` over `devices`; None: the loop's train step (train/trainer.py)."""
        return None

    def describe_step(self, config, setup) -> dict:
        """Facts about that step for --dry_run's params.json, from the abstract `setup`
        (train/trainer.py `Setup`); {} for the loop's train step."""
        return {}

    def lm_positions_fraction(self, config) -> float:
        """Fraction of positions the vocabulary-sized head runs at (for FLOPs)."""
        return 0.0

    def count_tokens(self, local_batch) -> tuple[int, int]:
        """(tokens, real tokens) in this process's batch, times the process count."""
        n = jax.process_count()
        total = sum(local_batch[t].size for t, _ in self.token_fields)
        real = sum(int((local_batch[s] > 0).sum()) for _, s in self.token_fields)
        return total * n, real * n


def register(task: Task) -> Task:
    if task.name in _TASKS:
        raise ValueError(f"Task {task.name!r} is registered twice")
    _TASKS[task.name] = task
    return task


def registered() -> tuple[str, ...]:
    return tuple(sorted(_TASKS))


def get_task(name: str) -> Task:
    """The registered task `name` (config.task); an unknown name lists the known ones."""
    if name not in _TASKS:
        raise ValueError(f"config.task={name!r} is not a registered task; registered: "
                         f"{', '.join(registered())} (train/tasks/)")
    return _TASKS[name]


def loop_task(name: str) -> Task:
    """The task the loop trains for `config.task = name` (itself, or e.g. rag's
    generator task)."""
    task = get_task(name)
    return get_task(task.loop_task) if task.loop_task else task


def abstract_batch(config, sharding, rows=None):
    """The global train batch as ShapeDtypeStructs with `sharding` (AOT compiles)."""
    task = loop_task(config.task)
    rows = config.data.batch_size if rows is None else rows
    return {k: jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)
            for k, (shape, dtype) in task.batch_fields(config, rows).items()}


def check_heads(config, needed, what):
    missing = [h for h in needed if h not in config.model.heads]
    if missing:
        raise ValueError(f"config.task={config.task!r} needs {missing} in config.model.heads "
                         f"(has {tuple(config.model.heads)}); {what}")

