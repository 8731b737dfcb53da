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
                             log_every=steps, eval_steps=2, final_eval_steps=2,
                             progress=False))
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
        # Houlsby, bottleneck 64: down and up (+ biases) after attention and after the MLP,
        # and (as Houlsby et al.) every LayerNorm's scale and offset.
        "method=adapters,adapter_norms=False": head + layers * 2 * (2 * hidden * 64 + 64
                                                                     + hidden),
        "method=adapters": head + layers * 2 * (2 * hidden * 64 + 64 + hidden) + 2 * norms,
        # Li & Liang's MLP (width 512) over 20 vectors makes every layer's prefixes.
        "method=prefix_tuning,prefix_mlp_dim=512": head + 20 * hidden + hidden * 512 + 512
        + 512 * layers * 2 * hidden + layers * 2 * hidden,
    }
    # The published figures, without the task head (params.json "trainable_without_head").
    published = {"method=lora": 294_912, "method=prefix_tuning": 368_640,
                 "method=prompt_tuning": 15_360, "method=ia3": 55_296,
                 "method=adapters,adapter_norms=False": 2_379_264}
    for arg, want in expected.items():
        counts = loop.dry_run(finetune.get_config(f"{arg},size=base"), str(tmp_path))
        assert counts["trainable"] == want, arg
        assert counts["trainable_without_head"] == want - head, arg
        if arg in published:
            assert counts["trainable_without_head"] == published[arg], arg
        # Frozen parameters hold no Adam moments: 2 float32 per trainable parameter.
        assert counts["optimizer_state_bytes"] < 2 * 4 * want + 4096, arg


def test_init_from_without_checkpoint_is_refused(tmp_path):
    from train.init_from import resolve_checkpoint

    with pytest.raises(FileNotFoundError, match="config.init_from"):
        resolve_checkpoint(str(tmp_path))


def test_init_from_shape_mismatch_names_the_parameter_and_both_shapes(tmp_path):
    from train.init_from import init_params_from

    saved = {"params": {"encoder": {"token_embed": {"embedding": np.zeros((1000, 8),
                                                                          np.float32)}}}}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(str(tmp_path / "checkpoints" / "7" / "state"), saved)
    fresh = {"encoder": {"token_embed": {"embedding": jax.numpy.ones((8192, 8))}}}
    with pytest.raises(ValueError, match=r"encoder/token_embed/embedding: \(1000, 8\) -> "
                                         r"\(8192, 8\).*config.data.vocab_size"):
        init_params_from(str(tmp_path), fresh)


@pytest.mark.slow
def test_pretraining_beats_scratch_and_forgetting_is_reported(wordnet_data_dir, tmp_path):
    """The seeds' claim at toy scale: at equal fine-tuning steps, seeds and 1% of the
    labels, starting from the MLM encoder beats starting from random weights.
    results.json then reports the held-out MLM loss before (== the pre-training run's own
    last evaluation: same text, masks and batches) and after fine-tuning."""
    pretrained = str(tmp_path / "mlm")
    mlm = small_run(pretrain_mlm.get_config("runlocal,size=tiny"), wordnet_data_dir, 800)
    mlm.data.batch_size = 32
    mlm.optim.update(dict(lr=3e-3, warmup_steps=50))
    mlm.train.eval_steps = 8
    loop.train_and_evaluate(mlm, pretrained)

    results = {}
    for name, init_from in (("pretrained", pretrained), ("scratch", "")):
        config = small_run(finetune.get_config("method=full,runlocal,size=tiny"),
                           wordnet_data_dir, 150)
        config.init_from = init_from
        config.data.label_fraction = 0.01  # Where the claim matters: few labels (945).
        config.data.batch_size = 32
        config.optim.lr = 3e-3
        config.train.update(dict(eval_steps=8, final_eval_steps=20))
        results[name] = loop.train_and_evaluate(config, str(tmp_path / name))

    pre, scratch = results["pretrained"]["validation"], results["scratch"]["validation"]
    assert pre["loss"] < scratch["loss"] - 0.05, (pre, scratch)
    assert pre["accuracy"] > scratch["accuracy"], (pre, scratch)

    forgetting = results["pretrained"]["forgetting"]
    logged = [json.loads(line) for line in open(os.path.join(pretrained, "metrics.jsonl"))]
    last_eval = [r for r in logged if "eval/loss" in r][-1]
    assert forgetting["before"]["loss"] == pytest.approx(last_eval["eval/loss"], rel=1e-5)
    assert forgetting["before"]["accuracy"] == pytest.approx(last_eval["eval/accuracy"],
                                                             rel=1e-5)
    assert forgetting["increase"] == pytest.approx(
        forgetting["after"]["loss"] - forgetting["before"]["loss"])
    assert forgetting["after"]["loss"] != forgetting["before"]["loss"]  # The encoder moved.
    assert "forgetting" not in results["scratch"]  # Nothing pre-trained to forget.
    memory = results["pretrained"]["peak_memory"]
    params_bytes = 4 * results["pretrained"]["parameters"]["total"]
    assert memory["compiled_step_bytes"] > 3 * params_bytes  # Params, Adam mu and nu, ...
    assert memory["host_peak_rss_bytes"] > memory["compiled_step_bytes"]
