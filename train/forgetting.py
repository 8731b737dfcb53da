"""Forgetting: held-out MLM loss of the pre-trained encoder before and after fine-tuning.

"before" is the pre-training checkpoint exactly as it was pre-trained (its encoder and
MLM head, no fine-tuning modules). "after" is the fine-tuned encoder as it is used (LoRA,
adapters, prefixes ... included) under the same pre-trained MLM head, which fine-tuning
never saw. Both read the same masked held-out text, evaluated as the pre-training run
evaluated itself (its text, sequence length, fixed masks, split and number of batches,
from its config.json), so "before" is that run's own last held-out figure and the
difference is what fine-tuning cost the encoder at its pre-training task.
"""

import dataclasses
import json
import logging
import os

import jax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from model import finetune_methods
from model.transformer import Model, resolve
from train import model_setup
from train.data import pipeline, sources
from train.init_from import load_params
from train.objectives import MaskedLM
from train.param_rules import map_paths, param_paths
from train.steps import make_eval_step
from train.tasks import masking
from train.trainer import evaluate

log = logging.getLogger("strata")

# Model fields that add fine-tuning modules; "before" turns them off.
PEFT_OFF = finetune_methods.PEFT_OFF


# What defines the pre-training run's held-out MLM evaluation, taken from its config.json.
HELDOUT_FIELDS = ("seq_len", "wordnet_text", "eval_split", "eval_batch_size", "mlm_rate",
                  "mlm_whole_word", "mlm_max_predictions")


def pretraining_config(step_dir):
    """The config.json of the run a checkpoint dir (<workdir>/checkpoints/<step>) belongs
    to, or None."""
    path = os.path.join(os.path.dirname(os.path.dirname(step_dir)), "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def mlm_data_config(data_cfg, pretraining=None):
    """The fine-tuning data config (same source and tokenizer), evaluated as the
    pre-training run evaluated itself: its text, sequence length, masking and split. With
    no pre-training config: the fine-tuning one, reading glosses and examples."""
    data_cfg = data_cfg.copy_and_resolve_references()
    if pretraining is not None:
        for key in HELDOUT_FIELDS:
            if key in pretraining.get("data", {}):
                data_cfg[key] = pretraining["data"][key]
    elif data_cfg.source == "wordnet":
        data_cfg.wordnet_text = "gloss_and_examples"
    return data_cfg


def has_mlm_head(checkpoint_params):
    return any(name.startswith("mlm_head/") for name in checkpoint_params)


def mlm_params(model, seq_len, encoder_params, checkpoint_params, mesh):
    """The MLM model's params: encoder leaves from `encoder_params` (a tree, possibly
    sharded) where it has them, every other leaf (the MLM head) from the checkpoint's
    flat {path: array}, replicated."""
    abstract = model_setup.abstract_params(model, seq_len)
    encoder = dict(zip(param_paths(encoder_params), jax.tree_util.tree_leaves(encoder_params)))
    shapes = dict(zip(param_paths(abstract), jax.tree_util.tree_leaves(abstract)))
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path):
        if path.startswith("encoder/") and path in encoder:
            return encoder[path]
        value = checkpoint_params.get(path)
        if value is None or value.shape != shapes[path].shape:
            raise ValueError(
                f"Forgetting: the pre-trained checkpoint's {path!r} is "
                f"{None if value is None else value.shape}, the model needs "
                f"{shapes[path].shape}; set config.train.report_forgetting=False or make "
                f"config.model match the pre-training run")
        return jax.device_put(value, replicated)
    return map_paths(pick, abstract)


def heldout_mlm(model, params, data_cfg, tok, mesh, rules, split, max_steps):
    """{"loss", "accuracy"} of the MLM head over `max_steps` batches (-1: all) of `split`."""
    objective = MaskedLM()
    source = sources.load_split(data_cfg, split)
    batches = pipeline.make_eval_iterator(source, tok, data_cfg, with_labels=False,
                                          transform=masking.eval_transform(tok, data_cfg))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(make_eval_step(model, objective))
    return evaluate(step, objective, params, batches, mesh, rules, max_steps)


_BEFORE = {}  # The pre-trained encoder's held-out MLM metrics, by checkpoint and data.


def measure_forgetting(config, finetuned_params, tok, mesh, rules):
    """-> {"before", "after", "increase", "checkpoint", "split"}, or None (with a log
    line) when `config.init_from` has no MLM head to measure with."""
    if not config.init_from or config.init_from.startswith("hf:"):
        return None
    checkpoint_params, step_dir = load_params(config.init_from)
    if not has_mlm_head(checkpoint_params):
        log.info("Forgetting not measured: %s has no MLM head", step_dir)
        return None
    pretraining = pretraining_config(step_dir)
    data_cfg = mlm_data_config(config.data, pretraining)
    # As many batches as the pre-training run's own evaluations read.
    max_steps = (pretraining or {}).get("train", {}).get("eval_steps", config.train.eval_steps)
    split = data_cfg.eval_split
    fields = dict(heads=("mlm",))
    after_model = Model(dataclasses.replace(resolve(config.model), **fields))
    before_model = Model(dataclasses.replace(resolve(config.model), **fields, **PEFT_OFF))
    results = {}
    # "before" depends on the checkpoint alone: a sweep's runs from it measure it once.
    before_key = (os.path.realpath(step_dir), repr(before_model.cfg), data_cfg.to_json(),
                  split, max_steps, tuple(mesh.shape.items()))
    if before_key in _BEFORE:
        results["before"] = dict(_BEFORE[before_key])
    for name, model, encoder in (("before", before_model, {}),
                                 ("after", after_model, finetuned_params)):
        if name in results:
            continue
        params = mlm_params(model, data_cfg.seq_len, encoder, checkpoint_params, mesh)
        results[name] = heldout_mlm(model, params, data_cfg, tok, mesh, rules, split,
                                    max_steps)
    _BEFORE[before_key] = dict(results["before"])
    results["increase"] = results["after"]["loss"] - results["before"]["loss"]
    log.info("Forgetting: held-out MLM loss %.4f before fine-tuning, %.4f after",
             results["before"]["loss"], results["after"]["loss"])
    return {**results, "checkpoint": step_dir, "split": split}
