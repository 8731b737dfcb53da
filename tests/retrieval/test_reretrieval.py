"""Re-retrieval during decoding (retrieval/rag.py `Rag(reretrieve_every=N)`): one round is
plain RAG exactly; chunked decoding with the answer so far forced after a re-packed
prompt is one-shot decoding when the passages stay; a query steered by the generated
text records the new passages in its round. Tiny random models, a word-level tokenizer,
the real Retriever over an ExactIndex (a fixed-passage stub only for the equivalence)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import model_config
from model.transformer import Model, resolve
from retrieval import rag as rag_lib
from retrieval.exact import ExactIndex

WORDS = ("what is a the kind of which word means dog cat animal bird red blue green big "
         "small fast slow tree river stone light dark house water fire hound poodle coat "
         "member genus living organism land bank sound").split()
VOCAB = 64  # Ids past the words decode as "w<id>" (and encode back as [UNK]).
SEQ_LEN, MAX_ANSWER = 40, 8  # Prompt budget 31; answers of up to 8 pieces + [SEP].
QUESTIONS = ["what is a poodle a kind of", "which word means a hunting dog",
             "what is a dog a kind of"]
PASSAGES = {"p0": "poodle a big dog with a thick coat", "p1": "dog a member of the genus",
            "p2": "animal a living organism", "p3": "bank land beside the river water",
            "p4": "hound a hunting dog", "p5": "fire light and house stone"}


class WordTokenizer:
    """One piece per known word (what train/data/tokenizer.py's classes expose)."""

    pad_id, unk_id, cls_id, sep_id = 0, 1, 2, 3
    _special = {0: "[PAD]", 1: "[UNK]", 2: "[CLS]", 3: "[SEP]"}

    def __init__(self):
        self._ids = {w: 4 + i for i, w in enumerate(WORDS)}
        self._words = {i: w for w, i in self._ids.items()} | self._special

    def encode(self, text):
        return [self._ids.get(w, self.unk_id) for w in text.lower().split()]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return " ".join(self._words.get(int(i), f"w{int(i)}") for i in ids)


@functools.cache
def generator_parts():
    """A 2-layer prefix-LM generator; init_std 0.5 keeps its argmaxes clear of ties."""
    model = Model(resolve(model_config(
        "tiny", vocab_size=VOCAB, max_len=SEQ_LEN, dropout=0.0, attention_dropout=0.0,
        heads=("lm",), norm="pre", init_std=0.5, attention_mask="prefix")))
    tokens = jnp.ones((1, 4), jnp.int32)
    return model, model.init(jax.random.key(0), tokens, prefix_mask=tokens > 0)["params"]


@functools.cache
def encoder():
    """A random bidirectional tiny encoder: (params, model, tokenizer, max_len)."""
    model = Model(resolve(model_config("tiny", vocab_size=VOCAB, max_len=64, dropout=0.0,
                                       attention_dropout=0.0, heads=())))
    tokens = jnp.ones((1, 4), jnp.int32)
    params = model.init(jax.random.key(1), tokens, segment_ids=tokens,
                        method=lambda m, t, **kw: m.encoder(t, **kw))["params"]
    return params, model, WordTokenizer(), 32


def generator(batch_size=2):  # 2 < 3 questions: several batches, the last one padded.
    model, params = generator_parts()
    return rag_lib.Generator(model, params, WordTokenizer(), SEQ_LEN, MAX_ANSWER,
                             batch_size=batch_size)


def retriever(passages=PASSAGES):
    """The real Retriever over an exact index of the passages' embeddings."""
    r = rag_lib.Retriever(encoder(), None, dict(passages), batch_size=8)
    ids = list(passages)
    r.index = ExactIndex(r.embed([passages[i] for i in ids]), ids)
    return r


@pytest.mark.parametrize("every", [MAX_ANSWER, 100])
def test_one_round_is_plain_rag(every):
    rag = rag_lib.Rag(retriever(), generator())
    plain = rag.answer(QUESTIONS, k=2)
    assert rag.answer(QUESTIONS, k=2, reretrieve_every=every) == plain  # Rounds included.
    assert rag_lib.Rag(rag.retriever, rag.generator, reretrieve_every=every).answer(
        QUESTIONS, k=2) == plain
    for answer in plain:
        (only,) = answer.rounds
        assert only.query == answer.question and only.after_tokens == 0
        assert only.citations == answer.citations and len(answer.citations) >= 1


class FixedRetriever:
    """The same passages whatever the query (records the queries): the equivalence only."""

    def __init__(self, passages, ids):
        self.passages, self.ids, self.queries = passages, ids, []

    def search(self, queries, k):
        self.queries.append(list(queries))
        n = len(queries)
        return (np.tile(np.linspace(1.0, 0.5, k, dtype=np.float32), (n, 1)),
                np.array([self.ids[:k]] * n))


def test_chunked_decoding_with_forced_answer_equals_one_shot():
    gen, every = generator(), 2
    passages = [[PASSAGES["p0"], PASSAGES["p3"]]] * len(QUESTIONS)
    one_shot, used = gen.generate_ids(QUESTIONS, passages)
    # Rows run past several chunk boundaries (else the test would show nothing).
    assert max(len(p) for p in one_shot) > 2 * every, one_shot

    # Generator level, token for token: N new pieces at a time, the rest forced.
    pieces = [[] for _ in QUESTIONS]
    for start in range(0, MAX_ANSWER + 1, every):
        active = [i for i, p in enumerate(pieces) if gen.tokenizer.sep_id not in p]
        out, used_now = gen.generate_ids([QUESTIONS[i] for i in active],
                                         [passages[i] for i in active],
                                         [pieces[i] for i in active],
                                         min(every, MAX_ANSWER + 1 - start))
        assert used_now == [used[i] for i in active]
        for row, i in enumerate(active):
            assert out[row][:start] == pieces[i]  # The forced pieces come back first.
            pieces[i] = out[row]
    assert pieces == one_shot

    # The Rag loop: the same answers, a round per chunk begun, queries carry the answer.
    stub = FixedRetriever(PASSAGES, ["p0", "p3"])
    rag = rag_lib.Rag(stub, gen)
    chunked = rag.answer(QUESTIONS, k=2, reretrieve_every=every)
    assert [a.answer for a in chunked] == [gen.text(p) for p in one_shot]
    assert [a.answer for a in chunked] == [a.answer for a in rag.answer(QUESTIONS, k=2)]
    for answer, ids in zip(chunked, one_shot):
        # A round at each multiple of N below MAX_ANSWER that the row reached without
        # [SEP] (not before the closing [SEP] slot).
        before_sep = len(ids) - (ids[-1] == gen.tokenizer.sep_id)
        expected = min(before_sep, MAX_ANSWER - 1) // every + 1
        assert [r.after_tokens for r in answer.rounds] == \
            [every * i for i in range(expected)], (ids, answer.rounds)
        for r in answer.rounds[1:]:
            assert r.query == f"{answer.question} {gen.text(ids[:r.after_tokens])}"
            assert r.citations == [("p0", 1.0), ("p3", 0.5)] == answer.citations
    assert stub.queries[0] == QUESTIONS


def test_generated_text_steers_the_next_retrieval():
    """Passage A is embedded as the question itself, B as the question plus the answer's
    first N pieces: round 0 retrieves A, round 1 (its query extended by those pieces) B."""
    gen, every = generator(), 2
    passages = {f"A{i}": "fire light and house stone" for i in range(len(QUESTIONS))}
    r = rag_lib.Retriever(encoder(), None, dict(passages), batch_size=8)
    r.index = ExactIndex(r.embed(QUESTIONS), list(passages))
    before = rag_lib.Rag(r, gen, reretrieve_every=every).answer(QUESTIONS, k=1)
    steered = [i for i, a in enumerate(before) if len(a.rounds) > 1]
    assert steered, [a.rounds for a in before]  # Some answer outlived its first chunk.

    extended = {i: before[i].rounds[1].query for i in steered}
    r.index.upsert([f"B{i}" for i in steered], r.embed(list(extended.values())))
    r.passages.update({f"B{i}": "water river bank land" for i in steered})
    after = rag_lib.Rag(r, gen, reretrieve_every=every).answer(QUESTIONS, k=1)
    for i in steered:
        rounds = after[i].rounds
        assert rounds[0].query == QUESTIONS[i] and rounds[1].query == extended[i]
        assert [c for c, _ in rounds[0].citations] == [f"A{i}"]
        assert [c for c, _ in rounds[1].citations] == [f"B{i}"]
        assert rounds[1].citations[0][1] == pytest.approx(1.0, abs=1e-5)
        # Later rounds may move on; the answer cites the last one.
        assert after[i].citations == rounds[-1].citations

    # What rag_run's "rag_reretrieve" mode reports in results.json.
    from retrieval.rag_run import _reretrieval_stats

    gold = [f"B{i}" if i in steered else f"A{i}" for i in range(len(QUESTIONS))]
    stats = _reretrieval_stats(after, gold)
    share = len(steered) / len(QUESTIONS)
    assert stats["passages_changed"] == pytest.approx(share)
    assert stats["gold_passage_cited_first_round"] == pytest.approx(1 - share)
    assert stats["gold_passage_cited_any_round"] == 1.0
    assert stats["mean_rounds"] == np.mean([len(a.rounds) for a in after]) > 1
