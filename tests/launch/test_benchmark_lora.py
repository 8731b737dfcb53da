"""launch/benchmark_lora.py's pieces that would skew the comparison quietly: strata's LoRA
targets onto HF's module names, the causal-LM batch, the race's bookkeeping (stand-in
implementations), and, where torch is installed, HF PEFT's trainable count against
strata's on a tiny Llama (the real run loads SmolLM2 and torch: a benchmark, not a test)."""

import argparse
import json

import numpy as np
import pytest

from launch import benchmark_lora
from train import tasks
from train.trainer import abstract_setup

ARGS = dict(batch=2, seq_len=8, rank=4, alpha=8.0, lr=1e-3, steps=2, rounds=2)


def test_targets_map_onto_hf_module_names():
    assert benchmark_lora.hf_target_modules("query|value") == ["q_proj", "v_proj"]
    assert benchmark_lora.hf_target_modules("gate|wi|wo") == ["up_proj", "down_proj",
                                                                "gate_proj"]
    assert len(benchmark_lora.hf_target_modules(".*")) == 7
    with pytest.raises(ValueError, match="matches none"):
        benchmark_lora.hf_target_modules("q_proj")  # HF's name, not strata's.


def test_lm_batch_predicts_every_next_token_in_the_tasks_shape():
    tokens = np.arange(2 * 8).reshape(2, 8) + 5
    batch = benchmark_lora.lm_batch(tokens)
    np.testing.assert_array_equal(batch["targets"][:, :-1], tokens[:, 1:])
    # HF's labels=input_ids: the mean over batch * (seq - 1) tokens.
    assert batch["target_weights"].sum() == 2 * 7 and not batch["target_weights"][:, -1].any()
    assert not batch["prefix_mask"].any() and batch["segment_ids"].all()
    config = benchmark_lora.make_config(argparse.Namespace(targets="query|value", **ARGS))
    fields = tasks.loop_task(config.task).batch_fields(config, 2)
    assert {k: (v.shape, str(v.dtype)) for k, v in batch.items()} == fields


class Stand:
    """Loss 2.0 at step 0, falling by 0.1 a step."""

    def __init__(self, name, trainable, start=2.0):
        self.name, self.trainable, self.loss, self.calls = name, trainable, start, []

    def __call__(self, steps):
        self.calls.append(steps)
        losses = [self.loss - 0.1 * i for i in range(steps)]
        self.loss -= 0.1 * steps
        return losses


def test_race_alternates_and_compares_counts_and_step0_losses(capsys):
    args = argparse.Namespace(targets="query|value", **ARGS)
    strata, hf = Stand("strata", 100), Stand("hf", 96, start=2.001)
    summary = benchmark_lora.race([strata, hf], args)
    assert strata.calls == [1, 2, 2] == hf.calls  # A warm-up step, then 2 rounds of 2.
    assert summary["strata_step0_loss"] == 2.0 and summary["step0_loss_difference"] == 0.001
    assert summary["trainable_agree"] is False
    assert summary["strata_over_hf"] > 0 and len(summary["strata_over_hf_per_round"]) == 2
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    rounds = [line["implementation"] for line in lines if "round" in line]
    assert rounds == ["strata", "hf", "hf", "strata"]  # The order flips every round.


@pytest.mark.parametrize("targets", ["query|value", "key|out|wo"])
def test_trainable_counts_match_hf_peft_on_a_tiny_llama(targets):
    """strata's count (abstract: nothing compiles) against the analytic one, and against
    PEFT's on transformers' Llama of the same dimensions when torch is installed."""
    args = argparse.Namespace(targets=targets, **ARGS)
    config = benchmark_lora.make_config(args)
    dims = dict(vocab_size=64, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_dim=48, max_len=8)
    config.model.update(dims)
    config.data.vocab_size, config.init_from = dims["vocab_size"], ""  # Not the file's.
    strata = abstract_setup(config).counts["trainable"]
    attention, kv = 4 * 8, 2 * 8
    shapes = {"query": (32, attention), "key": (32, kv), "value": (32, kv),
              "out": (attention, 32), "wo": (48, 32)}
    assert strata == 2 * sum(args.rank * (i + o) for t, (i, o) in shapes.items()
                             if t in targets.split("|"))

    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True))
    hf = benchmark_lora.HFLoRA(argparse.Namespace(torch_threads=1, targets=targets, **ARGS),
                               np.ones((2, 8), np.int32), model=llama)
    assert hf.trainable == strata
