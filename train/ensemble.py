"""An ensemble of fine-tuned runs: average their logits over an evaluation split.

Members may differ in anything that keeps the task the same (method, seed, size, label
fraction): each is rebuilt from its own `config.json` and checkpoint. They must share the
tokenizer and the number of classes, so every member reads the same token ids.
"""

import json
import os

import jax
import ml_collections
import numpy as np

from train import model_setup
from train.data import pipeline, sources, tokenizer
from train.init_from import load_params
from train.objectives import macro_f1
from train.param_rules import map_paths, param_paths
from train.steps import model_inputs


def load_run(workdir, which="best"):
    """-> (config, model, params) of a run: its `best` checkpoint (or the latest one when
    `which="latest"` or the run kept no best)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir!r} is not a strata run directory: no config.json")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if which not in ("best", "latest"):
        raise ValueError(f"which={which!r}; expected 'best' or 'latest'")
    best = os.path.join(workdir, "best")
    has_best = os.path.isdir(best) and any(s.isdigit() for s in os.listdir(best))
    flat, _ = load_params(best if which == "best" and has_best else workdir)
    model = model_setup.build_model(config)
    abstract = model_setup.abstract_params(model, config.data.seq_len)
    missing = [p for p in param_paths(abstract) if p not in flat]
    if missing:
        raise ValueError(f"The checkpoint of {workdir!r} lacks {missing[:5]} that its "
                         f"config.json's model has")
    params = map_paths(lambda p: flat[p], abstract)
    return config, model, params


def split_logits(config, model, params, split):
    """-> (logits [n, classes] float32, labels [n]) over every example of `split`."""
    data_cfg = config.data
    tok = tokenizer.get_tokenizer(data_cfg)
    apply = jax.jit(lambda params, batch: model.apply(
        {"params": params}, batch["tokens"], **model_inputs(batch), deterministic=True,
        heads=("classify",))["classify"])
    logits, labels = [], []
    source = sources.load_split(data_cfg, split)
    for batch in pipeline.make_eval_iterator(source, tok, data_cfg, with_labels=True,
                                             process_index=0, process_count=1):
        real = batch["example_weight"] > 0
        logits.append(np.asarray(apply(params, batch), np.float32)[real])
        labels.append(batch["labels"][real])
    return np.concatenate(logits), np.concatenate(labels)


def classification_metrics(logits, labels, num_classes):
    predictions = logits.argmax(-1)
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, (labels, predictions), 1)
    return {"accuracy": float((predictions == labels).mean()),
            "macro_f1": macro_f1(confusion), "examples": int(labels.size)}


def check_compatible(configs, workdirs):
    """Members must read the same token ids and predict the same classes."""
    def key(c):
        return (tokenizer.tokenizer_path(c.data).as_posix(), c.model.num_classes,
                c.data.source, c.data.get("tfds_name", ""))
    first = key(configs[0])
    for config, workdir in zip(configs[1:], workdirs[1:]):
        if key(config) != first:
            raise ValueError(
                f"Run {workdir!r} cannot join an ensemble with {workdirs[0]!r}: "
                f"(tokenizer, num_classes, source, tfds_name) {key(config)} != {first}")


def evaluate_ensemble(workdirs, split="test", which="best"):
    """-> {"members": [{workdir, accuracy, macro_f1, examples}], "ensemble": {...}}, the
    ensemble predicting the argmax of the members' mean logits."""
    if not workdirs:
        raise ValueError("An ensemble needs at least one run directory")
    runs = [load_run(w, which) for w in workdirs]
    check_compatible([r[0] for r in runs], workdirs)
    num_classes = runs[0][0].model.num_classes
    members, all_logits, labels = [], [], None
    for workdir, (config, model, params) in zip(workdirs, runs):
        logits, member_labels = split_logits(config, model, params, split)
        if labels is not None and not np.array_equal(labels, member_labels):
            raise ValueError(f"Run {workdir!r} reads a different {split!r} split")
        labels = member_labels
        all_logits.append(logits)
        members.append({"workdir": workdir,
                        **classification_metrics(logits, labels, num_classes)})
    mean_logits = np.mean(all_logits, axis=0)
    return {"split": split, "which": which, "members": members,
            "ensemble": classification_metrics(mean_logits, labels, num_classes),
            "mean_logits": mean_logits}
