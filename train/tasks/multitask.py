"""Several WordNet classification tasks on one backbone (task "multitask").

Every task labels the same synsets' glosses differently (TASKS). A batch mixes rows of
several tasks; each row carries `task_ids` and its label within its task, and the model
routes it to its task's adapters and head (model/multitask.py). Config (data.*):

  tasks               the model's tasks, in task-id order (config.model.num_tasks of them)
  train_tasks         those this run trains on (() = all); continual fine-tuning trains one
  mixture_temperature T: task t is drawn with p_t ∝ n_t^(1/T) (1 = proportional to its
                      size, large T -> uniform over tasks; Arivazhagan et al. 2019)
  replay_tasks        earlier tasks whose replay buffer joins the training mixture
  replay_fraction     the buffer: this fraction of each replay task's training examples
  replay_share        the buffer's share of the mixture's rows (buffer examples repeat to
                      fill it; 0 = each buffered example once)
  eval_examples_per_task  cap on each task's validation/test examples (0 = all)

The mixture is a fixed, seeded list of (task, example) slots (`Mixture`): the pipeline
shuffles it like any source, so batches are deterministic in the seed and a resumed run
continues where it stopped (grain's iterator state). Through the pipeline a row's label is
`task * num_classes + label`; `SplitTaskLabels` turns it back into (task_ids, labels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import grain
import numpy as np

from train import objectives
from train.data import augmentation, pipeline, sources
from train.data.records import TfdsSplit
from train.tasks.registry import Task, check_heads, register

POS_CLASSES = ("n", "v", "a", "r")  # Adjective satellites count as "a".
SYNSET_SIZES = ("1", "2", "3+")  # Lemmas in the synset.


@dataclasses.dataclass(frozen=True)
class WordnetTask:
    """One labelling of WordNet synsets: `label(example)` -> class id < num_classes."""

    num_classes: int
    label: Callable[[dict], int]
    fields: tuple  # The synset fields `label` reads (besides "label").
    description: str


# name -> the task. Adding a task is one entry.
TASKS = {
    "supersense": WordnetTask(45, lambda ex: ex["label"], (),
                              "lexicographer file (45 supersenses)"),
    "pos": WordnetTask(len(POS_CLASSES), lambda ex: POS_CLASSES.index(ex["pos"]), ("pos",),
                       "part of speech (n, v, a, r)"),
    "synset_size": WordnetTask(len(SYNSET_SIZES), lambda ex: min(len(ex["lemmas"]), 3) - 1,
                               ("lemmas",), "synonyms in the synset (1, 2, 3+)"),
}


def get(name):
    if name not in TASKS:
        raise ValueError(f"config.data.tasks has {name!r}; expected names from "
                         f"{', '.join(TASKS)}")
    return TASKS[name]


def task_classes(names):
    """The class count of each task in `names`: config.model.task_classes."""
    return tuple(get(n).num_classes for n in names)


def mixture_counts(sizes, temperature):
    """Slots per task in one pass over the mixture: sum(sizes) slots split p_t ∝
    n_t^(1/T). T = 1 is exactly `sizes` (proportional: every example once)."""
    sizes = np.asarray(sizes, np.float64)
    if temperature <= 0:
        raise ValueError(f"config.data.mixture_temperature={temperature}; expected > 0")
    if temperature == 1:
        return sizes.astype(np.int64)
    p = sizes ** (1.0 / temperature)
    return np.maximum(1, np.round(sizes.sum() * p / p.sum())).astype(np.int64)


def replay_indices(size, fraction, seed):
    """The replay buffer of a task with `size` training examples: round(fraction * size)
    of them (at least 1), chosen by `seed` alone, sorted: deterministic, so a resumed or
    repeated phase replays the same examples."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"config.data.replay_fraction={fraction}; expected in (0, 1]")
    keep = max(1, round(fraction * size))
    return np.sort(np.random.default_rng(seed).permutation(size)[:keep])


def slots(size, count, seed):
    """`count` indices into a task of `size` examples: whole seeded permutations, then a
    part of one (up-sampling repeats every example before any repeats twice)."""
    rng = np.random.default_rng(seed)
    reps = -(-count // size)
    return np.concatenate([rng.permutation(size) for _ in range(reps)])[:count]


class LabelledTask:
    """A WordNet split relabelled for task `task_id`: random access to {"text", "label",
    "task_id"}; the labels are read once (`labels`, int64 [n])."""

    def __init__(self, base, name, task_id):
        self.base, self.name, self.task_id = base, name, task_id
        task = get(name)
        keys = ("label", *task.fields)
        if isinstance(base, TfdsSplit):  # Bulk reads of the few fields used.
            rows = base.iter_range(keys=keys)
        else:  # Subsets and plain sequences.
            rows = (base[i] for i in range(len(base)))
        self.labels = np.fromiter((task.label(ex) for ex in rows), np.int64, len(base))

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return {"text": self.base[int(i)]["text"], "label": int(self.labels[int(i)]),
                "task_id": self.task_id}


class Mixture:
    """Rows of several `LabelledTask`s: part k contributes its examples `indices[k]` (in
    that order, repeats allowed). Row label = task_id * num_classes + label (the pipeline
    carries one int label per row; `SplitTaskLabels` splits it)."""

    labelled = True
    label_names = None

    def __init__(self, parts, indices, num_classes, interleave=False):
        self.parts, self.num_classes = parts, num_classes
        self.indices = [np.asarray(i, np.int64) for i in indices]
        if interleave:  # Round-robin over parts: any prefix of an eval pass has every task.
            order = [(k, j) for j in range(max(map(len, self.indices)))
                     for k in range(len(parts)) if j < len(self.indices[k])]
        else:
            order = [(k, j) for k in range(len(parts)) for j in range(len(self.indices[k]))]
        self._order = np.asarray(order, np.int64).reshape(-1, 2)

    def __len__(self):
        return len(self._order)

    def __getitem__(self, i):
        k, j = self._order[int(i)]
        ex = self.parts[k][self.indices[k][j]]
        return {"text": ex["text"], "label": ex["task_id"] * self.num_classes + ex["label"]}

    def task_counts(self):
        """{task name: rows of it in the mixture}."""
        return {p.name: int(len(i)) for p, i in zip(self.parts, self.indices)}


class SplitTaskLabels(grain.transforms.Map):
    """A batch's combined labels -> `task_ids` [batch] and labels within the task."""

    def __init__(self, num_classes):
        self.num_classes = num_classes

    def map(self, batch):
        combined = batch["labels"]
        return {**batch, "task_ids": (combined // self.num_classes).astype(np.int32),
                "labels": (combined % self.num_classes).astype(np.int32)}


def _split_labels(num_classes):
    return lambda it: it.map(SplitTaskLabels(num_classes))


class MultiTask(Task):
    name = "multitask"
    measures_forgetting = True
    # The loop alone, or the study its config carries: config.study (multi-task vs one
    # model per task) or config.continual (tasks in sequence); each trains this task's
    # runs in subdirectories.
    runner = "train.experiments.multitask:run"

    def check(self, config):
        check_heads(config, ("classify",), "each task's classifier is a slice of it")
        d, m = config.data, config.model
        names = tuple(d.tasks)
        for name in names:
            get(name)
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"config.data.tasks={names}; expected distinct task names")
        if m.num_tasks != len(names) or tuple(m.task_classes) != task_classes(names):
            raise ValueError(
                f"config.model.num_tasks={m.num_tasks}, task_classes={tuple(m.task_classes)} "
                f"do not describe config.data.tasks={names}; set num_tasks={len(names)}, "
                f"task_classes={task_classes(names)}")
        for key in ("train_tasks", "replay_tasks"):
            unknown = set(d[key]) - set(names)
            if unknown:
                raise ValueError(f"config.data.{key} has {sorted(unknown)}, not among "
                                 f"config.data.tasks={names}")
        if d.source != "wordnet":
            raise ValueError(f"config.data.source={d.source!r}; the multitask tasks label "
                             f"WordNet synsets (source='wordnet')")
        if config.train.class_weighted_loss or config.train.label_smoothing:
            raise ValueError("config.train.class_weighted_loss / label_smoothing are not "
                             "supported by task 'multitask' (classes differ per task)")
        if d.packing:
            raise ValueError("config.data.packing=True: a multitask row is one example")

    def load_split(self, data_cfg, split):
        names = tuple(data_cfg.tasks)
        num_classes = max(task_classes(names))
        fields = sorted({f for n in names for f in get(n).fields})
        base = sources.load_split(data_cfg, split, extra_fields=tuple(fields))
        parts = [LabelledTask(base, name, t) for t, name in enumerate(names)]
        if split != data_cfg.train_split:
            cap = data_cfg.eval_examples_per_task
            indices = [np.arange(min(len(p), cap) if cap > 0 else len(p)) for p in parts]
            return Mixture(parts, indices, num_classes, interleave=True)
        trained = [names.index(n) for n in (data_cfg.train_tasks or names)]
        counts = mixture_counts([len(parts[t]) for t in trained],
                                data_cfg.mixture_temperature)
        chosen = [parts[t] for t in trained]
        indices = [slots(len(parts[t]), c, data_cfg.shuffle_buffer_seed + t)
                   for t, c in zip(trained, counts)]
        replay = tuple(data_cfg.replay_tasks)
        share = float(data_cfg.replay_share)
        if not 0.0 <= share < 1.0:
            raise ValueError(f"config.data.replay_share={share}; expected in [0, 1)")
        # Rows per replayed task when the buffer fills `share` of the mixture.
        fill = round(share / (1.0 - share) * int(sum(counts)) / max(len(replay), 1))
        for name in replay:
            t = names.index(name)
            buffer = replay_indices(len(parts[t]), data_cfg.replay_fraction,
                                    data_cfg.shuffle_buffer_seed + t)
            chosen.append(parts[t])
            indices.append(buffer if not share else
                           buffer[slots(len(buffer), fill, data_cfg.shuffle_buffer_seed + t)])
        return Mixture(chosen, indices, num_classes)

    def check_source(self, config, source, split):
        if len(source) == 0:
            raise ValueError(f"config.data: split {split!r} has no example of "
                             f"{tuple(config.data.tasks)}")

    def train_iterator(self, source, tok, data_cfg, seed):
        augment = augmentation.train_transform(tok, data_cfg, seed=seed)
        split = _split_labels(source.num_classes)
        return pipeline.make_train_iterator(
            source, tok, data_cfg, seed=seed,
            transform=lambda it: split(augment(it) if augment else it))

    def eval_iterator(self, source, tok, data_cfg):
        return pipeline.make_eval_iterator(source, tok, data_cfg,
                                           transform=_split_labels(source.num_classes))

    def objective(self, config, train_source=None):
        return objectives.MultiTaskClassification(task_names=tuple(config.data.tasks))

    def batch_fields(self, config, rows):
        return super().batch_fields(config, rows) | {"labels": ((rows,), "int32"),
                                                     "task_ids": ((rows,), "int32")}


register(MultiTask())

