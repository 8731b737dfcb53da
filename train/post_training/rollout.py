"""Rollouts: prompts from prefix-LM examples, G completions per prompt sampled by the
compiled decoding loop (model/decoding.py `generate`: KV cache, temperature, top-p), and
the update batch that scores them.

Update batch (rows R, L = data.seq_len), right-padded:
  tokens, segment_ids, positions   int32 [R, L]  prompt + completion, then padding
  targets                          int32 [R, L]  tokens shifted left
  completion_mask                  float32 [R, L] 1 where position j predicts a
                                   completion token (its end-of-turn token included)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from model.decoding import DecodeConfig, generate
from train.tasks import prefix_lm_examples

PROMPT_BUCKET = 32  # Prompt widths round up to a multiple: few compiled sampling shapes.


def stop_id(tokenizer, prompt_format: str) -> int:
    """The token that ends an answer: the chat template's end of turn, or [SEP]."""
    return tokenizer.eos_id if prompt_format == "chat" else tokenizer.sep_id


def prompt_ids(tokenizer, example, data_cfg, max_new_tokens, closed_book=False):
    """The prompt tokens of one example (as the SFT task wrote them), leaving room for
    `max_new_tokens`; closed_book drops its passages."""
    example = {**example, "answer": ""}
    if closed_book:
        example["passages"] = []
    row, prompt_len, _ = prefix_lm_examples.encode_example(
        tokenizer, example, data_cfg.seq_len, max_new_tokens, data_cfg.prompt_format)
    return row[:prompt_len]


def decode_config(post_cfg, tokenizer, prompt_format, greedy=False) -> DecodeConfig:
    return DecodeConfig(strategy="greedy" if greedy else "sample",
                        max_new_tokens=int(post_cfg.max_new_tokens),
                        temperature=float(post_cfg.temperature), top_p=float(post_cfg.top_p),
                        eos_id=stop_id(tokenizer, prompt_format), pad_id=tokenizer.pad_id)


def sample(model, params, prompts, config: DecodeConfig, rng, max_len):
    """prompts: token lists [rows] -> new tokens np.int32 [rows, max_new_tokens] (pad
    after a row's end token). One compiled program per (rows, bucketed width)."""
    width = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
    width = max(min(width, max_len - config.max_new_tokens), max(len(p) for p in prompts))
    tokens = np.full((len(prompts), width), config.pad_id, np.int32)
    for i, ids in enumerate(prompts):
        tokens[i, :len(ids)] = ids
    lengths = np.array([len(p) for p in prompts], np.int32)
    new, _ = generate(model, params, jnp.asarray(tokens), jnp.asarray(lengths), config,
                      rng=rng)
    return np.asarray(new)


def completions(new_tokens, stop: int):
    """-> (token lists up to and including the stop token, finished flags)."""
    out, finished = [], []
    for row in np.asarray(new_tokens):
        ids = [int(t) for t in row]
        done = stop in ids
        out.append(ids[:ids.index(stop) + 1] if done else ids)
        finished.append(done)
    return out, finished


def answer_text(tokenizer, ids, stop: int) -> str:
    return tokenizer.decode([t for t in ids if t != stop])


def update_batch(prompts, answers, seq_len: int, pad_id: int):
    """Rows prompt + answer (token lists) -> the update batch (module docstring)."""
    rows = len(prompts)
    tokens = np.full((rows, seq_len), pad_id, np.int32)
    mask = np.zeros((rows, seq_len), np.float32)
    lengths = np.zeros((rows,), np.int32)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        row = list(prompt) + list(answer)
        if len(row) > seq_len:
            raise ValueError(f"A prompt of {len(prompt)} tokens and a completion of "
                             f"{len(answer)} exceed config.data.seq_len={seq_len}")
        tokens[i, :len(row)] = row
        lengths[i] = len(row)
        mask[i, len(prompt) - 1:len(row) - 1] = 1.0  # Position j predicts token j + 1.
    real = np.arange(seq_len)[None, :] < lengths[:, None]
    targets = np.concatenate([tokens[:, 1:], np.full((rows, 1), pad_id, np.int32)], axis=1)
    return {"tokens": tokens, "segment_ids": real.astype(np.int32),
            "positions": np.where(real, np.arange(seq_len)[None, :], 0).astype(np.int32),
            "targets": targets, "completion_mask": mask}


def example_order(num_examples: int, count: int, seed: int, start: int) -> np.ndarray:
    """Example indices `start .. start + count` of an endless sequence of epochs, each a
    permutation drawn from (seed, epoch): a pure function of the position, so a resumed
    run reads the same prompts without any iterator state."""
    positions = np.arange(start, start + count)
    out = np.empty(count, np.int64)
    for epoch in np.unique(positions // num_examples):
        order = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
        here = positions // num_examples == epoch
        out[here] = order[positions[here] % num_examples]
    return out


def rollout_key(seed: int, step: int, stream: int = 0):
    """The sampling key of step `step`: from (seed, stream, step) alone."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), step)
