"""Retrieval-augmented generation: questions -> encode -> top-k -> pack -> decode -> answers
with the ids and scores of the passages they were given (citations).

    rag = Rag(retriever, generator)
    results = rag.answer(["What is a poodle a kind of?"], k=3)
    results[0].answer, results[0].citations  # "dog", [("n02113335", 0.71), ...]

`Retriever` embeds questions with a sentence encoder (train/embedding.py; all-MiniLM-L6-v2
by default) and searches any index of retrieval/index.py. `Generator` packs each
question with its passages into the prefix of the shared transformer in prefix-LM mode
(train/tasks/prefix_lm_examples.py: the question is never truncated) and decodes with the KV cache
(model/decoding.py), a fixed [batch, prompt] shape so one compilation serves every call.

Re-retrieval during decoding (`Rag(..., reretrieve_every=N)`, config.rag.reretrieve_every):
every N answer pieces, the unfinished rows search again with the question plus their
answer so far, and decode on from a prompt re-packed with the new passages, the pieces
so far kept causal after it (`prefix_lengths` of model/decoding.py). `Answer.rounds`
holds each retrieval's query and citations; `Answer.citations` is the last round's.

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
from train.embedding import embed_texts, make_encode_fn
from train.tasks import prefix_lm_examples as prefix_lm

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


def gold_contained(prediction: str, answers) -> float:
    """1.0 when a gold answer appears in the prediction, case-insensitive, not inside a
    longer word: a chat model's "A poodle is a kind of dog." contains "dog"."""
    predicted = " ".join(prediction.lower().split())
    return float(any(re.search(rf"(?<!\w){re.escape(' '.join(a.lower().split()))}(?!\w)",
                               predicted) for a in answers if a.strip()))


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

    def embed(self, texts, progress=None) -> np.ndarray:
        """texts -> L2-normalised float32 [n, dim]; `progress(done, elapsed_s)` per batch."""
        return embed_texts(self.params, self.model, self.tokenizer, texts,
                           batch_size=self.batch_size, max_len=self.max_len,
                           encode_fn=self._encode_fn, progress=progress)

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
class RetrievalRound:
    """One retrieval behind an answer: the query, how many answer pieces were decoded
    before it, and the (passage id, score) pairs it packed into the prompt."""
    query: str
    after_tokens: int
    citations: list[tuple[str, float | None]]


@dataclasses.dataclass
class Answer:
    question: str
    answer: str
    # (passage id, retrieval score or None when not retrieved) packed into the prompt
    # that produced the answer's last pieces (the final retrieval round).
    citations: list[tuple[str, float | None]]
    # Every retrieval, in order (one without re-retrieval; none for `answer_with`).
    rounds: list[RetrievalRound] = dataclasses.field(default_factory=list)
    # Read from an earlier mode's identical prompt (Rag.answer_with(reuse=True)).
    reused: bool = False


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

    def prompts(self, questions, passages, answers=None):
        """questions [n], passages [n][m] texts (best first), answers [n] answer pieces
        already decoded (default none) -> (prompts int32 [n, budget + longest answer]
        right-padded: packed question and passages, then the answer so far; lengths [n];
        prefix lengths [n]: the packed part, the bidirectional prefix; passages used [n])."""
        tok = self.tokenizer
        answers = [[] for _ in questions] if answers is None else answers
        width = self.budget + max((len(a) for a in answers), default=0)
        tokens = np.full((len(questions), width), tok.pad_id, np.int32)
        lengths = np.zeros((len(questions),), np.int32)
        prefix_lengths, used = np.zeros((len(questions),), np.int32), []
        for row, (question, texts, answer) in enumerate(zip(questions, passages, answers)):
            question_ids, *passage_ids = tok.encode_batch([question, *texts])
            prompt, count = prefix_lm.pack_prompt(question_ids, passage_ids, self.budget,
                                                  tok.cls_id, tok.sep_id)
            tokens[row, :len(prompt) + len(answer)] = [*prompt, *answer]
            lengths[row], prefix_lengths[row] = len(prompt) + len(answer), len(prompt)
            used.append(count)
        return tokens, lengths, prefix_lengths, used

    def generate_ids(self, questions, passages, answers=None, max_new_tokens=None):
        """Decodes (batched, fixed shapes) -> (answer pieces [n]: `answers[i]` (kept, read
        causally after the prefix) then up to `max_new_tokens` (default the whole
        answer's max_answer_tokens + 1) new ones, ending at [SEP] when one was emitted;
        passages used per question [n])."""
        tokens, lengths, prefix_lengths, used = self.prompts(questions, passages, answers)
        config = self.decode_config if max_new_tokens is None else \
            dataclasses.replace(self.decode_config, max_new_tokens=max_new_tokens)
        sep = self.tokenizer.sep_id
        out = []
        for start in range(0, len(questions), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            rows = [tokens[chunk], lengths[chunk], prefix_lengths[chunk]]
            real = rows[0].shape[0]
            if real < self.batch_size:  # Pad the batch: one compiled shape for all calls.
                rows = [np.concatenate([x, np.repeat(x[:1], self.batch_size - real, axis=0)])
                        for x in rows]
            new, _ = generate(self.model, self.params, jnp.asarray(rows[0]),
                              jnp.asarray(rows[1]), config,
                              prefix_lengths=jnp.asarray(rows[2]))
            for row in np.asarray(new)[:real]:
                ids = [int(t) for t in row]  # Padding only after [SEP]: before, a token.
                out.append(ids[:ids.index(sep) + 1] if sep in ids else ids)
        answers = [[] for _ in questions] if answers is None else answers
        return [[*answer, *ids] for answer, ids in zip(answers, out)], used

    def text(self, ids) -> str:
        """Answer pieces -> text: cut at [SEP], padding dropped."""
        ids = list(ids)
        if self.tokenizer.sep_id in ids:
            ids = ids[:ids.index(self.tokenizer.sep_id)]
        return self.tokenizer.decode([t for t in ids if t != self.tokenizer.pad_id]).strip()

    def generate(self, questions, passages) -> tuple[list[str], list[int]]:
        """-> (answer texts [n], passages used per question [n]); batched, fixed shapes."""
        ids, used = self.generate_ids(questions, passages)
        return [self.text(row) for row in ids], used


# --- The loop -----------------------------------------------------------------------------

class Rag:
    """Retriever + generator: questions in, answers with citations out (batched).

    `reretrieve_every` N > 0 (config.rag.reretrieve_every): decode N answer pieces at a
    time; before each further chunk, the rows still without [SEP] retrieve again with
    the question + " " + their answer so far, the prompt is re-packed with the new
    passages (same packing) and decoding goes on with the pieces so far kept, causal
    after the new prefix, as the generator saw answers in training. Re-retrieval
    happens only before an answer piece (not before the closing [SEP] slot), so
    N >= max_answer_tokens is one round: plain RAG. Each round decodes a fixed
    [batch, budget + pieces so far] shape, so a call compiles once per round number.
    """

    def __init__(self, retriever: Retriever, generator: Generator, reretrieve_every: int = 0):
        self.retriever, self.generator = retriever, generator
        self.reretrieve_every = reretrieve_every
        # (question, passage texts) -> (answer, passages used) of every prompt decoded
        # here: greedy decoding answers a prompt the same way twice, so an evaluation
        # whose prompts repeat an earlier mode's (exact search retrieving what the index
        # did) reads them (`answer_with(reuse=True)`) instead of decoding them again.
        self.decoded: dict[tuple, tuple[str, int]] = {}
        self.deterministic = generator.decode_config.strategy == "greedy"

    def answer(self, questions, k: int, reretrieve_every: int | None = None) -> list[Answer]:
        """Top-k retrieval then decoding; `reretrieve_every` overrides the Rag's."""
        every = self.reretrieve_every if reretrieve_every is None else reretrieve_every
        if every < 0:
            raise ValueError(f"reretrieve_every={every}; expected >= 0 (0 = off)")
        if every:
            return self._answer_reretrieving(list(questions), k, every)
        scores, ids = self.retriever.search(list(questions), k)
        answers = self.answer_with(questions, ids, scores)
        for a in answers:  # The one retrieval, recorded as re-retrieval records each.
            a.rounds = [RetrievalRound(a.question, 0, list(a.citations))]
        return answers

    def answer_with(self, questions, ids, scores=None, reuse=False) -> list[Answer]:
        """Answers from given passage ids [n][m] (retrieved, oracle, or none: [[]] * n).
        `reuse`: prompts already decoded here (greedy decoding only) are not decoded
        again (their Answer.reused is set)."""
        passages = [[self.retriever.passages[i] for i in row] for row in ids]
        keys = [(q, tuple(p)) for q, p in zip(questions, passages)]
        reuse = reuse and self.deterministic
        todo = list(dict.fromkeys(k for k in keys if not (reuse and k in self.decoded)))
        texts, used = self.generator.generate([q for q, _ in todo], [list(p) for _, p in todo])
        decoded = dict(zip(todo, zip(texts, used)))
        if self.deterministic:
            self.decoded.update(decoded)
        answers = []
        for row, key in enumerate(keys):
            text, count = decoded[key] if key in decoded else self.decoded[key]
            answers.append(Answer(key[0], text, _citations(
                ids[row], None if scores is None else scores[row], count),
                reused=key not in decoded))
        return answers

    def _answer_reretrieving(self, questions, k, every) -> list[Answer]:
        gen, sep = self.generator, self.generator.tokenizer.sep_id
        total = gen.decode_config.max_new_tokens  # max_answer_tokens + [SEP].
        pieces = [[] for _ in questions]
        rounds = [[] for _ in questions]
        active = list(range(len(questions)))  # Rows without [SEP] yet.
        for start in range(0, max(gen.max_answer_tokens, 1), every):
            last = start + every >= gen.max_answer_tokens
            queries = [" ".join(filter(None, [questions[i], gen.text(pieces[i])]))
                       for i in active]
            scores, ids = self.retriever.search(queries, k)
            passages = [[self.retriever.passages[p] for p in row] for row in ids]
            out, used = gen.generate_ids([questions[i] for i in active], passages,
                                         [pieces[i] for i in active],
                                         total - start if last else every)
            for row, i in enumerate(active):
                pieces[i] = out[row]
                rounds[i].append(RetrievalRound(queries[row], start, _citations(
                    ids[row], scores[row], used[row])))
            active = [i for i in active if sep not in pieces[i]]
            if last or not active:
                break
        return [Answer(q, gen.text(p), list(r[-1].citations), r)
                for q, p, r in zip(questions, pieces, rounds)]


def _citations(ids, scores, count) -> list[tuple[str, float | None]]:
    """The first `count` (packed) passages' (id, score); scores None: not retrieved."""
    ids = [str(i) for i in list(ids)[:count]]
    return list(zip(ids, [None] * len(ids) if scores is None
                    else [float(s) for s in list(scores)[:count]]))


def per_question_scores(answers, gold_answers) -> dict[str, list[float]]:
    """Answer texts [n], gold answer lists [n] -> {metric: per-question scores [n]}: what
    a paired test between two modes on the same questions needs."""
    return {"exact_match": [exact_match(a, g) for a, g in zip(answers, gold_answers)],
            "f1": [token_f1(a, g) for a, g in zip(answers, gold_answers)],
            "gold_contained": [gold_contained(a, g) for a, g in zip(answers, gold_answers)]}


def score_answers(answers: list[Answer], gold_answers, per_question=False) -> dict:
    """Answers [n] and gold answer lists [n] -> {exact_match, f1, gold_contained, count}
    (means), and with `per_question` each metric's per-question scores too."""
    scores = per_question_scores([a.answer for a in answers], gold_answers)
    out = {m: float(np.mean(v)) if v else 0.0 for m, v in scores.items()}
    out["count"] = len(answers)
    if per_question:
        out["per_question"] = scores
    return out
