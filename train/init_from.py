"""Initialise a run's parameters from another run's checkpoint (`config.init_from`).

Parameters whose path and shape match are loaded; the rest (new heads, PEFT modules)
keep their fresh initialisation; checkpoint parameters with no place in the new model
(an old head) are dropped. The three lists are logged and returned, so a fine-tuning run
says exactly what it started from. `hf:minilm` / `hf:<dir>` reads a Hugging Face BERT
checkpoint (safetensors) through model/hf_bert.py; there, shapes must match exactly.
"""

import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from model import gguf_llama, hf_bert
from model.config import check_architecture
from train.checkpoints import newest_verified_step_dir
from train.param_rules import path_string

log = logging.getLogger("strata")


def resolve_checkpoint(path):
    """A workdir (-> its latest checkpoint), a `checkpoints/` dir, or one step's dir."""
    path = os.path.abspath(path)
    for candidate in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(candidate) and any(s.isdigit() for s in os.listdir(candidate)):
            step_dir = newest_verified_step_dir(candidate)  # Corrupt steps skipped.
            if step_dir is None:
                raise FileNotFoundError(f"config.init_from={path!r}: every checkpoint in "
                                        f"{candidate} fails its checksum manifest")
            return step_dir
    if os.path.isdir(os.path.join(path, "state")):
        return path
    raise FileNotFoundError(
        f"config.init_from={path!r} holds no checkpoint: expected a workdir with "
        f"checkpoints/<step>/state, a checkpoints/ directory, or a <step> directory")


def load_params(path):
    """-> (flat {path: np.ndarray} of the checkpoint's params, checkpoint dir).

    `hf:<alias|dir>`: a Hugging Face BERT checkpoint (model/hf_bert.py), converted.
    """
    if path.startswith("hf:"):
        directory = hf_bert.resolve_dir(path)
        flat, _, _ = hf_bert.load(directory)
        return flat, directory
    if path.startswith("gguf:"):  # A Llama-family GGUF file, dequantized.
        flat, _, file = gguf_llama.load(path)
        return flat, file
    step_dir = resolve_checkpoint(path)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(os.path.join(step_dir, "state"))
    flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return {path_string(p): np.asarray(v) for p, v in flat}, step_dir


def merge_params(params, loaded):
    """-> (params with matching leaves replaced, report {loaded, initialised, dropped}).

    `params` are the freshly initialised (sharded) arrays; loaded leaves take their
    sharding.
    """
    report = {"loaded": [], "initialised": [], "dropped": [], "shape_mismatch": []}

    def pick(path, fresh):
        name = path_string(path)
        value = loaded.get(name)
        if value is None:
            report["initialised"].append(name)
            return fresh
        if value.shape != fresh.shape:
            report["shape_mismatch"].append(f"{name}: {value.shape} -> {fresh.shape}")
            report["initialised"].append(name)
            return fresh
        report["loaded"].append(name)
        return jax.device_put(value.astype(fresh.dtype), fresh.sharding)

    merged = jax.tree_util.tree_map_with_path(pick, params)
    used = set(report["loaded"]) | set(report["initialised"])
    report["dropped"] = sorted(set(loaded) - used)
    return merged, report


def check_hf_model_config(config):
    """`init_from=hf:...`: config.model must have the checkpoint's architecture; fails at
    start-up naming each mismatched field with both values and the overrides to use."""
    init_from = config.get("init_from", "")
    if init_from.startswith("gguf:"):
        gguf_llama.check_model_config(config.model, init_from)
        return
    if not init_from.startswith("hf:"):
        return
    fields = hf_bert.model_fields(hf_bert.read_config(hf_bert.resolve_dir(init_from)))
    if config.model.head_dim in (-1, None):  # Derived as hidden // num_heads: as BERT.
        del fields["head_dim"]
    check_architecture(config.model, fields, init_from, "the checkpoint",
                       "configs/finetune.py:hf=<alias>")


def init_params_from(path, params):
    loaded, step_dir = load_params(path)
    merged, report = merge_params(params, loaded)
    if report["shape_mismatch"]:
        # A checkpoint must fit exactly: silently re-initialising, say, a vocabulary-sized
        # embedding table would waste the pre-training without anyone noticing.
        hint = ("set config.model to the checkpoint's config.json"
                if path.startswith(("hf:", "gguf:"))
                else "make config.model (and config.data.vocab_size) match the run it came "
                     "from")
        raise ValueError(
            f"config.init_from={path!r}: parameter shapes differ (checkpoint -> model): "
            f"{report['shape_mismatch']}; {hint}")
    if not report["loaded"]:
        raise ValueError(
            f"config.init_from={path!r} ({step_dir}) shares no parameter (path and shape) "
            f"with this model; its parameters are e.g. {sorted(loaded)[:5]}")
    log.info("init_from %s: loaded %d, initialised fresh %d %s, dropped %d %s", step_dir,
             len(report["loaded"]), len(report["initialised"]), report["initialised"][:8],
             len(report["dropped"]), report["dropped"][:8])
    return merged, {"checkpoint": step_dir, **report}
