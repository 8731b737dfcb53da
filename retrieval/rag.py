"""Retrieval-augmented generation: questions -> encode -> top-k -> pack -> decode -> answers
with the ids and scores of the passages they were given (citations).

    rag = Rag(retriever, generator)
    results = rag.answer(["What is a poodle a kind of?"], k=3)
    results[0].answer, results[0].citations  # "dog", [("n02113335", 0.71), ...]

`Retriever` embeds questions with a sentence encoder (train/embedding.py; all-MiniLM-L6-v2
by default) and searches any index of retrieval/index.py. `Generator` packs each
question with its passages into the prefix of the shared transformer in prefix-LM mode
(train/data/prefix_lm.py: the question is never truncated) and decodes with the KV cache
(model/decoding.py), a fixed [batch, prompt] shape so one compilation serves every call.

Scoring follows SQuAD: answers are lower-cased, stripped of punctuation and articles;
exact match and token F1 take the best over the gold answers.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string

import jax.numpy as jnp
import numpy as np

from model.decoding import DecodeConfig, generate
from train.data import prefix_lm
from train.embedding import embed_texts, make_encode_fn

# --- Scores -------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(prediction: str, answers) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers) -> float:
    """Best token-overlap F1 of the prediction against the gold answers (SQuAD)."""
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        if not predicted or not gold:
            best = max(best, float(predicted == gold))
            continue
        common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
        if common:
            precision, recall = common / len(predicted), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def recall_at_k(retrieved_ids, gold_ids) -> float:
    """Fraction of questions whose gold passage is among their retrieved ids [q, k]."""
    if len(gold_ids) == 0:
        return 0.0
    return float(np.mean([gold in set(row) for row, gold in zip(retrieved_ids, gold_ids)]))


# --- Retrieval ----------------------------------------------------------------------------

class Retriever:
    """Sentence encoder + index + passage texts: questions -> top-k (ids, scores)."""

    def __init__(self, encoder, index, passages: dict[str, str], batch_size: int = 64):
        """encoder: (params, model, tokenizer, max_len) as train.embedding.load_encoder."""
        self.params, self.model, self.tokenizer, self.max_len = encoder
        self.index, self.passages, self.batch_size = index, passages, batch_size
        self._encode_fn = make_encode_fn(self.model)

    def embed(self, texts) -> np.ndarray:
        """texts -> L2-normalised float32 [n, dim]."""
        return embed_texts(self.params, self.model, self.tokenizer, texts,
                           batch_size=self.batch_size, max_len=self.max_len,
                           encode_fn=self._encode_fn)

    def search(self, questions, k: int) -> tuple[np.ndarray, np.ndarray]:
        """questions (n strings) -> (scores float32 [n, k], passage ids str [n, k])."""
        if not questions:
            raise ValueError("No questions to retrieve for")
        if any(not q.strip() for q in questions):
            raise ValueError("Empty question: nothing to retrieve for")
        return self.index.search(self.embed(questions), k)

    def add_passages(self, passages: dict[str, str]) -> None:
        """New knowledge without retraining: embed and upsert passages into the index."""
        ids = list(passages)
        self.index.upsert(ids, self.embed([passages[i] for i in ids]))
        self.passages.update(passages)


# --- Generation ---------------------------------------------------------------------------

@dataclasses.dataclass
class Answer:
    question: str
    answer: str
    # (passage id, retrieval score or None when not retrieved) packed into the prompt.
    citations: list[tuple[str, float | None]]


class Generator:
    """The prefix-LM transformer answering a question from passages packed before it."""

    def __init__(self, model, params, tokenizer, seq_len: int, max_answer_tokens: int,
                 batch_size: int = 32):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.seq_len, self.max_answer_tokens = seq_len, max_answer_tokens
        self.budget = prefix_lm.prompt_budget(seq_len, max_answer_tokens)
        self.batch_size = batch_size
        self.decode_config = DecodeConfig(
            strategy="greedy", max_new_tokens=max_answer_tokens + 1,
            eos_id=tokenizer.sep_id, pad_id=tokenizer.pad_id)

    def prompts(self, questions, passages) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """questions [n], passages [n][m] texts (best first) -> (prompts int32 [n, budget]
        right-padded, lengths [n], passages used per question [n])."""
        tok = self.tokenizer
        tokens = np.full((len(questions), self.budget), tok.pad_id, np.int32)
        lengths, used = np.zeros((len(questions),), np.int32), []
        for row, (question, texts) in enumerate(zip(questions, passages)):
            question_ids, *passage_ids = tok.encode_batch([question, *texts])
            prompt, count = prefix_lm.pack_prompt(question_ids, passage_ids, self.budget,
                                                  tok.cls_id, tok.sep_id)
            tokens[row, :len(prompt)] = prompt
            lengths[row] = len(prompt)
            used.append(count)
        return tokens, lengths, used

    def generate(self, questions, passages) -> tuple[list[str], list[int]]:
        """-> (answer texts [n], passages used per question [n]); batched, fixed shapes."""
        tokens, lengths, used = self.prompts(questions, passages)
        answers = []
        for start in range(0, len(questions), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            batch_tokens, batch_lengths = tokens[chunk], lengths[chunk]
            real = batch_tokens.shape[0]
            if real < self.batch_size:  # Pad the batch: one compiled shape for all calls.
                pad = self.batch_size - real
                batch_tokens = np.concatenate([batch_tokens, np.repeat(batch_tokens[:1], pad,
                                                                       axis=0)])
                batch_lengths = np.concatenate([batch_lengths, np.repeat(batch_lengths[:1],
                                                                         pad)])
            out, _ = generate(self.model, self.params, jnp.asarray(batch_tokens),
                              jnp.asarray(batch_lengths), self.decode_config)
            for row in np.asarray(out)[:real]:
                ids = [int(t) for t in row]
                if self.tokenizer.sep_id in ids:
                    ids = ids[:ids.index(self.tokenizer.sep_id)]
                answers.append(self.tokenizer.decode(
                    [t for t in ids if t != self.tokenizer.pad_id]).strip())
        return answers, used


# --- The loop -----------------------------------------------------------------------------

class Rag:
    """Retriever + generator: questions in, answers with citations out (batched)."""

    def __init__(self, retriever: Retriever, generator: Generator):
        self.retriever, self.generator = retriever, generator

    def answer(self, questions, k: int) -> list[Answer]:
        scores, ids = self.retriever.search(list(questions), k)
        return self.answer_with(questions, ids, scores)

    def answer_with(self, questions, ids, scores=None) -> list[Answer]:
        """Answers from given passage ids [n][m] (retrieved, oracle, or none: [[]] * n)."""
        passages = [[self.retriever.passages[i] for i in row] for row in ids]
        texts, used = self.generator.generate(list(questions), passages)
        out = []
        for row, (question, text, count) in enumerate(zip(questions, texts, used)):
            row_scores = [None] * len(ids[row]) if scores is None else \
                [float(s) for s in scores[row]]
            out.append(Answer(question, text, list(zip(map(str, list(ids[row])[:count]),
                                                       row_scores[:count]))))
        return out


def score_answers(answers: list[Answer], gold_answers) -> dict:
    """Answers [n] and gold answer lists [n] -> {exact_match, f1, count} (means)."""
    em = [exact_match(a.answer, gold) for a, gold in zip(answers, gold_answers)]
    f1 = [token_f1(a.answer, gold) for a, gold in zip(answers, gold_answers)]
    return {"exact_match": float(np.mean(em)) if em else 0.0,
            "f1": float(np.mean(f1)) if f1 else 0.0, "count": len(em)}
