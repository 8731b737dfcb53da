"""Prefix-LM examples: a prompt (question + context passages) and the answer it should get.

An example is a dict {"question": str, "passages": [str, ...], "answer": str} (plus any
ids a caller keeps alongside). One row of the model's input is

    [CLS] question [SEP] passage_1 [SEP] passage_2 [SEP] ... | answer [SEP] [PAD]...
    \\___________________ prefix (bidirectional) ___________/ \\__ targets __/

`pack_prompt` builds the prefix within a token budget: the question is never cut (a
question that does not fit is an error), passages are added in order and the last one
that fits is truncated, the rest dropped. The budget leaves room for
`max_answer_tokens` answer pieces plus [SEP], so decoding the same prefix has room to
answer. Training reads the loss only where the next token is an answer token or its
[SEP] (`target_weights`).

Batch format (B rows, L = data_cfg.seq_len), the pipeline's plus three fields:
  tokens, segment_ids, positions, example_weight   as train/data/pipeline.py
  prefix_mask     bool    [B, L]  True on the prompt (what decoding is given)
  targets         int32   [B, L]  tokens shifted left: the token after each position
  target_weights  float32 [B, L]  1 where `targets` is an answer token or its [SEP]
"""

from __future__ import annotations

import json
import os

import grain
import numpy as np

from train.data import pipeline

MIN_PASSAGE_TOKENS = 4  # A passage cut shorter than this is dropped, not kept as a stub.


def prompt_budget(seq_len: int, max_answer_tokens: int) -> int:
    """Tokens the prompt may take: what is left after the answer and its [SEP]."""
    budget = seq_len - max_answer_tokens - 1
    if budget < 3:
        raise ValueError(f"seq_len={seq_len} leaves {budget} prompt tokens after "
                         f"max_answer_tokens={max_answer_tokens}; need at least 3")
    return budget


def pack_prompt(question_ids, passages_ids, budget: int, cls_id: int, sep_id: int):
    """-> (prompt ids [<= budget], passages_used: how many passages (whole or cut) it holds).

    question_ids: the question's pieces; passages_ids: each passage's pieces, best first.
    Raises ValueError when the question alone (with [CLS] and [SEP]) exceeds the budget:
    the question is never truncated.
    """
    prompt = [cls_id, *question_ids, sep_id]
    if len(prompt) > budget:
        raise ValueError(
            f"The question takes {len(prompt)} tokens with [CLS]/[SEP], more than the "
            f"prompt budget of {budget} (seq_len minus the answer's room); questions are "
            f"never truncated: raise config.data.seq_len or shorten the question")
    used = 0
    for ids in passages_ids:
        room = budget - len(prompt) - 1  # One [SEP] closes each passage.
        if room < min(MIN_PASSAGE_TOKENS, len(ids)) or room <= 0:
            break
        prompt.extend(ids[:room])
        prompt.append(sep_id)
        used += 1
        if len(ids) > room:
            break  # This passage was cut: nothing after it fits.
    return prompt, used


def encode_chat_example(tokenizer, example, seq_len: int, max_answer_tokens: int):
    """`data.prompt_format="chat"`: the ChatML prompt of train/tasks/chat_prompt.py (what
    the chat decoder is asked at test time), the answer, the end-of-turn token.
    -> (tokens list, prompt length, passages used). Passages that do not fit are dropped
    whole, last first (a cut passage in a chat prompt misleads); the question never is."""
    from train.tasks.chat_prompt import prompt_ids

    answer = tokenizer.encode(example.get("answer", ""))[:max_answer_tokens]
    passages = list(example.get("passages", ()))
    while True:
        prompt = prompt_ids(tokenizer, example["question"], passages)
        if len(prompt) + max_answer_tokens + 1 <= seq_len:
            return prompt + answer + [tokenizer.eos_id], len(prompt), len(passages)
        if not passages:
            raise ValueError(
                f"The chat prompt of {example['question'][:40]!r} takes {len(prompt)} "
                f"tokens without passages; with max_answer_tokens={max_answer_tokens} and "
                f"the end-of-turn token it exceeds config.data.seq_len={seq_len}")
        passages.pop()


PROMPT_FORMATS = ("plain", "chat")


def question_lengths(tokenizer, data_cfg, questions) -> tuple[list[int], int]:
    """-> (each question's prompt tokens without passages, the most a prompt may take):
    a question longer than that cannot be asked (questions are never truncated)."""
    room = prompt_budget(data_cfg.seq_len, data_cfg.max_answer_tokens)
    if data_cfg.prompt_format == "chat":
        from train.tasks.chat_prompt import prompt_ids

        return [len(prompt_ids(tokenizer, q, [])) for q in questions], room
    return [len(ids) + 2 for ids in tokenizer.encode_batch(list(questions))], room


def encode_example(tokenizer, example, seq_len: int, max_answer_tokens: int,
                   prompt_format: str = "plain"):
    """-> (tokens list, prompt length, passages used) for one example (see module doc)."""
    if prompt_format == "chat":
        return encode_chat_example(tokenizer, example, seq_len, max_answer_tokens)
    question, *passages = tokenizer.encode_batch([example["question"],
                                                  *example.get("passages", ())])
    prompt, used = pack_prompt(question, passages, prompt_budget(seq_len, max_answer_tokens),
                               tokenizer.cls_id, tokenizer.sep_id)
    answer = tokenizer.encode(example.get("answer", ""))[:max_answer_tokens]
    return prompt + answer + [tokenizer.sep_id], len(prompt), used


class EncodePrefixLM(grain.transforms.Map):
    """A list of examples -> one batch dict (the module docstring's format)."""

    def __init__(self, tokenizer, seq_len: int, max_answer_tokens: int,
                 prompt_format: str = "plain"):
        self._tok, self._len, self._answer = tokenizer, seq_len, max_answer_tokens
        self._format = prompt_format

    def map(self, examples: list[dict]) -> dict[str, np.ndarray]:
        batch, length = len(examples), self._len
        tokens = np.full((batch, length), self._tok.pad_id, np.int32)
        prefix_mask = np.zeros((batch, length), bool)
        target_weights = np.zeros((batch, length), np.float32)
        lengths = np.zeros((batch,), np.int32)
        for i, example in enumerate(examples):
            row, prompt_len, _ = encode_example(self._tok, example, length, self._answer,
                                                self._format)
            tokens[i, :len(row)] = row
            lengths[i] = len(row)
            prefix_mask[i, :prompt_len] = True
            # Position j predicts token j + 1: answer tokens and [SEP] are prompt_len...
            target_weights[i, prompt_len - 1:len(row) - 1] = 1.0
        real = np.arange(length)[None, :] < lengths[:, None]
        example_weight = np.array([ex.get("example_weight", 1.0) for ex in examples],
                                  np.float32)
        target_weights *= example_weight[:, None]  # Eval's filler rows count for nothing.
        targets = np.concatenate([tokens[:, 1:], np.full((batch, 1), self._tok.pad_id,
                                                         np.int32)], axis=1)
        return {
            "tokens": tokens,
            "segment_ids": real.astype(np.int32),
            "positions": np.where(real, np.arange(length)[None, :], 0).astype(np.int32),
            "prefix_mask": prefix_mask,
            "targets": targets,
            "target_weights": target_weights,
            "example_weight": example_weight,
        }


# --- Sources and iterators --------------------------------------------------------------

def load_split(data_cfg, split: str) -> list[dict]:
    """`<data_cfg.qa_dir>/<split>.jsonl` (one example per line) -> list of dicts."""
    qa_dir = data_cfg.get("qa_dir", "")
    if not qa_dir:
        raise ValueError("config.task='prefix_lm' reads its examples from "
                         "config.data.qa_dir/<split>.jsonl; set config.data.qa_dir")
    path = os.path.join(qa_dir, f"{split}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No prefix-LM examples at {path}")
    with open(path) as f:
        examples = [json.loads(line) for line in f if line.strip()]
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def write_split(qa_dir: str, split: str, examples) -> str:
    """Writes examples (dicts) as `<qa_dir>/<split>.jsonl`; returns the path."""
    os.makedirs(qa_dir, exist_ok=True)
    path = os.path.join(qa_dir, f"{split}.jsonl")
    with open(path + ".tmp", "w") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")
    os.replace(path + ".tmp", path)
    return path


def _encoder(tokenizer, data_cfg) -> EncodePrefixLM:
    return EncodePrefixLM(tokenizer, data_cfg.seq_len, int(data_cfg.max_answer_tokens),
                          data_cfg.prompt_format)


def make_train_iterator(source, tokenizer, data_cfg, *, seed: int,
                        process_index=None, process_count=None) -> grain.DatasetIterator:
    """Infinite, shuffled per epoch, deterministic in `seed`; each process its own slice."""
    p, n = pipeline._process(process_index, process_count)
    batch = pipeline.per_process_batch(data_cfg.batch_size, n, "batch_size")
    ds = grain.MapDataset.source(source).shuffle(seed=pipeline._train_seed(seed, data_cfg))
    ds = ds.repeat()[p::n].batch(batch, drop_remainder=True, batch_fn=list)
    ds = ds.map(_encoder(tokenizer, data_cfg))
    return iter(ds.to_iter_dataset(pipeline._READ))


def make_eval_iterator(source, tokenizer, data_cfg, *, process_index=None,
                       process_count=None) -> grain.DatasetIterator:
    """One in-order pass, tail rows filled with weight-0 copies (as pipeline's)."""
    p, n = pipeline._process(process_index, process_count)
    batch = pipeline.per_process_batch(data_cfg.eval_batch_size, n, "eval_batch_size")
    length = pipeline.num_eval_batches(len(source), data_cfg.eval_batch_size, n) * batch
    ds = grain.MapDataset.source(pipeline._PaddedShard(source, p, n, length))
    ds = ds.batch(batch, drop_remainder=True, batch_fn=list)
    ds = ds.map(_encoder(tokenizer, data_cfg))
    return iter(ds.to_iter_dataset(pipeline._READ))
