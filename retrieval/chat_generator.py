"""A pre-trained chat decoder (SmolLM2-135M-Instruct from a GGUF file) as the RAG generator,
zero-shot: no weight update, the passages given in a ChatML prompt.

    generator = ChatGenerator.from_spec("gguf:smollm2", max_len=1024, max_new_tokens=24)
    texts, used = generator.generate(["What is a poodle a kind of?"],
                                     [["poodle: an intelligent dog ... A kind of: dog."]])

The same interface as retrieval/rag.py's `Generator` (`generate(questions, passages) ->
(answers, passages used)`), so `Rag.answer` / `Rag.answer_with` take either. The prompt:

    <|im_start|>system  Answer briefly, in a few words, from the numbered passages ...
    <|im_start|>user    [1] passage one\\n[2] passage two\\n\\nQuestion: ...
    <|im_start|>assistant

Closed-book (no passages): the system message asks for a brief answer and the user turn
holds the question alone. Decoding is greedy (or sampled: `strategy="sample"`) through
the KV cache (model/decoding.py),
batched `batch_size` questions at a time, prompts right-padded to a multiple of
`PROMPT_BUCKET` tokens so a few compiled shapes serve every call; an answer stops at the
end-of-turn token (`<|im_end|>`, the tokenizer's eos_id) and is cleaned: its first line,
stripped, without "[n]" citation markers.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from model import config as model_fields
from model import gguf_llama
from model.decoding import DecodeConfig, generate
from model.transformer import Model, resolve
from train.data import tokenizer as tokenizers
from train.embedding import unflatten
from train.tasks import chat_prompt

PROMPT_BUCKET = 32  # Prompt widths are rounded up to a multiple: few compiled shapes.

_CITATION_MARKERS = re.compile(r"\s*\[\d+\]")


def clean_answer(text: str) -> str:
    """The answer's first non-empty line, stripped, without "[n]" citation markers."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return _CITATION_MARKERS.sub("", lines[0]).strip() if lines else ""


class ChatGenerator:
    """A chat decoder answering questions from numbered passages in its prompt."""

    def __init__(self, model, params, tokenizer, max_new_tokens: int = 24,
                 batch_size: int = 16, spec: str = "", strategy: str = "greedy",
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 demonstrations=()):
        """strategy "sample": temperature / top-p sampling, batch b's draws from
        fold_in(key(seed), b) (reproducible). demonstrations: (question, passages, answer)
        exchanges shown before every question (k-shot prompting, no weight update)."""
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.max_new_tokens, self.batch_size, self.spec = max_new_tokens, batch_size, spec
        self.seed, self.demonstrations = seed, tuple(demonstrations)
        self.decode_config = DecodeConfig(strategy=strategy, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_p=top_p,
                                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)

    @classmethod
    def from_spec(cls, spec: str, max_len: int = 1024, **kwargs) -> ChatGenerator:
        """`gguf:smollm2` | `gguf:<path>` -> the file's decoder with a `max_len` context
        (the KV cache's longest prompt + answer; the file's own when larger)."""
        if not spec.startswith("gguf:"):
            raise ValueError(f"config.rag.generator={spec!r}; expected '' (the trained "
                             f"generator) or a 'gguf:<alias|path>' chat decoder")
        flat, fields, path = gguf_llama.load(spec)
        fields["max_len"] = min(fields["max_len"], max_len)
        cfg = dict(model_fields.DEFAULTS) | fields | dict(
            heads=("lm",), dropout=0.0, attention_dropout=0.0)
        model = Model(resolve(cfg))
        params = jax.tree.map(jnp.asarray, unflatten(flat))
        tokenizer = tokenizers.GGUFBPETokenizer(path)
        return cls(model, params, tokenizer, spec=spec, **kwargs)

    @classmethod
    def from_workdir(cls, workdir: str, **kwargs) -> ChatGenerator:
        """A chat decoder fine-tuned by the loop (RAFT on ChatML prompts, task "prefix_lm"
        with data.prompt_format="chat"; its PEFT parameters too) -> its generator."""
        import json
        import os

        import ml_collections

        from train import model_setup
        from train.init_from import load_params

        with open(os.path.join(workdir, "config.json")) as f:
            config = ml_collections.ConfigDict(json.load(f))
        flat, _ = load_params(workdir)
        params = jax.tree.map(jnp.asarray, unflatten(flat))
        return cls(model_setup.build_model(config), params,
                   tokenizers.get_tokenizer(config.data), spec=workdir, **kwargs)

    def prompt_ids(self, question: str, passages) -> list[int]:
        """The ChatML prompt's token ids; a ValueError when it and the answer cannot fit
        the model's context (never truncated: a cut passage or question misleads)."""
        ids = chat_prompt.prompt_ids(self.tokenizer, question, passages, self.demonstrations)
        limit = self.model.cfg.max_len
        if len(ids) + self.max_new_tokens > limit:
            raise ValueError(
                f"The prompt for {question[:40]!r} with {len(passages)} passages is "
                f"{len(ids)} tokens; with max_new_tokens={self.max_new_tokens} it exceeds "
                f"the model's context of {limit} tokens (config.model.max_len); use a "
                f"smaller config.rag.k or a longer context")
        return ids

    def generate_ids(self, questions, passages) -> list[list[int]]:
        """questions [n], passages [n][m] -> new token ids per question, up to and without
        the end-of-turn token; batched by `batch_size` (the last batch padded)."""
        encoded = [self.prompt_ids(q, p) for q, p in zip(questions, passages)]
        eos, out = self.tokenizer.eos_id, []
        for start in range(0, len(encoded), self.batch_size):
            rows = encoded[start:start + self.batch_size]
            real = len(rows)
            rows += [rows[0]] * (self.batch_size - real)  # One compiled batch size.
            width = -(-max(len(r) for r in rows) // PROMPT_BUCKET) * PROMPT_BUCKET
            width = min(width, self.model.cfg.max_len - self.max_new_tokens)
            tokens = np.full((len(rows), width), self.tokenizer.pad_id, np.int32)
            for i, ids in enumerate(rows):
                tokens[i, :len(ids)] = ids
            lengths = np.array([len(r) for r in rows], np.int32)
            new, _ = generate(self.model, self.params, jnp.asarray(tokens),
                              jnp.asarray(lengths), self.decode_config,
                              rng=jax.random.fold_in(jax.random.key(self.seed), start))
            for row in np.asarray(new)[:real]:
                ids = [int(t) for t in row]
                out.append(ids[:ids.index(eos)] if eos in ids else ids)
        return out

    def generate(self, questions, passages) -> tuple[list[str], list[int]]:
        """-> (cleaned answer texts [n], passages in each prompt [n]: all of them)."""
        if not questions:
            return [], []
        ids = self.generate_ids(list(questions), list(passages))
        return ([clean_answer(self.tokenizer.decode(row)) for row in ids],
                [len(p) for p in passages])
