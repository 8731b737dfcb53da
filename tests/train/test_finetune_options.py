"""The practitioner's fine-tuning options through the loop: L2-SP anchored at the loaded
checkpoint, class-balanced sampling, token augmentation, label fraction in results.json."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import finetune, pretrain_mlm
from train import loop
from train.data import sources
from train.param_rules import path_string


def small_run(config, data_dir, steps):
    config.data.data_dir = str(data_dir)
    config.train.update(dict(num_steps=steps, eval_every=steps, checkpoint_every=steps,
                             log_every=steps, eval_steps=2, final_eval_steps=2,
                             progress=False))
    return config


def restored_state(workdir, step):
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.mark.slow
def test_l2sp_balanced_augmented_fraction_run(wordnet_data_dir, tmp_path):
    pretrained, tuned = str(tmp_path / "mlm"), str(tmp_path / "ft")
    loop.train_and_evaluate(
        small_run(pretrain_mlm.get_config("runlocal,size=tiny"), wordnet_data_dir, 4), pretrained)

    config = small_run(finetune.get_config("method=full,runlocal,size=tiny"), wordnet_data_dir, 4)
    config.init_from = pretrained
    config.optim.update(dict(l2_strength=0.01, regularize_toward="init"))
    config.data.update(dict(label_fraction=0.1, sampling="class_balanced", token_dropout=0.1,
                            token_substitution=0.05))
    results = loop.train_and_evaluate(config, tuned)

    full = len(sources.load_split(small_run(finetune.get_config("runlocal"), wordnet_data_dir, 1)
                                  .data, "train"))
    data = json.load(open(os.path.join(tuned, "results.json")))["data"]
    assert data == results["data"]
    assert data["label_fraction"] == 0.1 and data["sampling"] == "class_balanced"
    assert data["train_examples"] == pytest.approx(0.1 * full, rel=0.02)  # Stratified ~10%.
    assert (data["token_dropout"], data["token_substitution"]) == (0.1, 0.05)

    # The anchor in the optimizer state is the loaded (pre-trained) embedding, not the
    # fine-tuning run's own random init, and it stays fixed while the params move.
    before = {path_string(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(
        restored_state(pretrained, 4)["params"])[0]}
    after = restored_state(tuned, 4)
    embedding = before["encoder/token_embed/embedding"]
    opt_leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(after["opt_state"])]
    assert any(x.shape == embedding.shape and np.array_equal(x, embedding) for x in opt_leaves)
    assert not np.array_equal(after["params"]["encoder"]["token_embed"]["embedding"], embedding)
