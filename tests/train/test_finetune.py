"""Pre-train (MLM) then fine-tune from its checkpoint: what loads, what stays frozen."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import finetune, pretrain_mlm
from train import loop
from train.param_rules import path_string


def flat_params(workdir, step):
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return {path_string(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]}


def small_run(config, data_dir, steps):
    config.data.data_dir = str(data_dir)
    config.train.update(dict(num_steps=steps, eval_every=steps, checkpoint_every=steps,
                             log_every=steps, eval_steps=2, progress=False))
    return config


@pytest.mark.slow
def test_linear_probe_from_mlm_checkpoint(wordnet_data_dir, tmp_path):
    pretrained, probe = str(tmp_path / "mlm"), str(tmp_path / "probe")
    mlm = small_run(pretrain_mlm.get_config("runlocal,size=tiny"), wordnet_data_dir, 10)
    # The fine-tuning data has one vocabulary size for both runs (runlocal's 1000).
    loop.train_and_evaluate(mlm, pretrained)

    config = small_run(finetune.get_config("method=linear_probe,runlocal,size=tiny"),
                       wordnet_data_dir, 10)
    config.init_from = pretrained
    results = loop.train_and_evaluate(config, probe)

    report = json.load(open(os.path.join(probe, "init_from.json")))
    assert report["checkpoint"].endswith(os.path.join("checkpoints", "10"))
    assert all(name.startswith("encoder/") for name in report["loaded"])
    assert "encoder/token_embed/embedding" in report["loaded"]
    assert all(name.startswith("classify_head/") for name in report["initialised"])
    assert report["dropped"] and all(n.startswith("mlm_head/") for n in report["dropped"])

    before, after = flat_params(pretrained, 10), flat_params(probe, 10)
    for name in report["loaded"]:  # Frozen: bitwise the pre-trained values.
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    head = [n for n in after if n.startswith("classify_head/") and n.endswith("kernel")]
    assert head and results["parameters"]["trainable"] == sum(
        after[n].size for n in after if n.startswith("classify_head/"))


def test_method_trainable_counts_follow_their_formulas(tmp_path):
    """BERT-base shapes: the trainable counts each method's definition gives."""
    layers, hidden, mlp, classes = 12, 768, 3072, 45
    head = hidden * hidden + hidden + hidden * classes + classes
    biases = layers * (4 * hidden + mlp + hidden)
    norms = (2 * layers + 1) * hidden  # Offsets of every LayerNorm, embeddings' included.
    block = 4 * (hidden * hidden + hidden) + 2 * hidden * mlp + mlp + hidden + 4 * hidden
    expected = {
        "method=linear_probe": head,
        "method=bitfit": head + biases,
        "method=bitfit,norm_offsets": head + biases + norms,
        "method=freeze,freeze_blocks=4": head + (layers - 4) * block,
        # LoRA r=8 on query and value: A [768, 8] + B [8, 12, 64] each.
        "method=lora": head + layers * 2 * 8 * (hidden + hidden),  # 294,912 + head.
        "method=ia3": head + layers * (hidden + hidden + mlp),  # 55,296 + head.
        "method=prompt_tuning": head + 20 * hidden,  # 15,360 + head.
        "method=prefix_tuning": head + layers * 2 * 20 * hidden,  # 368,640 + head.
        # Houlsby, bottleneck 64: down and up (+ biases) after attention and after the MLP.
        "method=adapters": head + layers * 2 * (2 * hidden * 64 + 64 + hidden),
    }
    for arg, want in expected.items():
        counts = loop.dry_run(finetune.get_config(f"{arg},size=base"), str(tmp_path))
        assert counts["trainable"] == want, arg
        # Frozen parameters hold no Adam moments: 2 float32 per trainable parameter.
        assert counts["optimizer_state_bytes"] < 2 * 4 * want + 4096, arg


def test_init_from_without_checkpoint_is_refused(tmp_path):
    from train.init_from import resolve_checkpoint

    with pytest.raises(FileNotFoundError, match="config.init_from"):
        resolve_checkpoint(str(tmp_path))
