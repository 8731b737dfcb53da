"""k-shot WordNet QA (retrieval/in_context_qa.py) without a model: demonstrations from the
training split only (seeded, nested, both kinds, k respected), the same for every query,
in the format of the query's setting, and the scores' intervals; the decoder and the
encoder are stand-ins, so this runs in well under a second."""

import re
import types

import numpy as np
import pytest

from retrieval import in_context_qa
from retrieval.chat_generator import ChatGenerator
from retrieval.wordnet_qa import Question
from train.data.wordnet import split_of
from train.tasks import chat_prompt

IDS = [f"n{i:08d}" for i in range(120)]


def _question(synset_id, kind):
    split = split_of(synset_id)
    if kind == "hypernym":
        return Question(f"{synset_id}-hypernym", kind, f"What is a w{synset_id} a kind of?",
                        (f"kind{synset_id}",), synset_id, split)
    return Question(f"{synset_id}-gloss", kind, f'Which word means "g{synset_id}"?',
                    (f"w{synset_id}",), synset_id, split)


def _questions(split):
    return [_question(i, kind) for i in IDS if split_of(i) == split
            for kind in ("hypernym", "gloss")]


def _passage(synset_id):
    return f"w{synset_id}: g{synset_id}. A kind of: kind{synset_id}."


def test_demonstrations_are_seeded_nested_alternating_and_from_the_training_split():
    pool = _questions("train")
    eight = in_context_qa.select_demonstrations(pool, 8, seed=0)
    assert len(eight) == 8 and len({q.qid for q in eight}) == 8
    assert all(q.split == "train" for q in eight)
    assert in_context_qa.select_demonstrations(pool, 8, seed=0) == eight  # Seeded.
    assert in_context_qa.select_demonstrations(pool, 8, seed=1) != eight
    for k in (0, 1, 3):  # Nested: rows differ by the added demonstrations only.
        assert in_context_qa.select_demonstrations(pool, k, seed=0) == eight[:k]
    kinds = [q.kind for q in eight]
    assert kinds[0::2] == [kinds[0]] * 4 and kinds[1::2] == [kinds[1]] * 4
    assert set(kinds) == {"hypernym", "gloss"}
    with pytest.raises(ValueError, match="training split"):
        in_context_qa.select_demonstrations(pool + _questions("test")[:1], 1)
    with pytest.raises(ValueError, match="k=500"):
        in_context_qa.select_demonstrations(pool, 500)


def test_exchanges_show_passages_only_in_the_retrieval_setting():
    demos = in_context_qa.select_demonstrations(_questions("train"), 8, seed=0)
    closed = in_context_qa.demonstration_exchanges(demos, "closed_book")
    assert closed == [(q.question, [], q.answers[0]) for q in demos]
    passages = {q.passage_id: _passage(q.passage_id) for q in demos}
    distractors = [[f"distractor of {q.qid}"] for q in demos]
    shown = in_context_qa.demonstration_exchanges(demos, "retrieval", passages,
                                                  distractors, seed=0)
    ranks = []
    for (question, texts, answer), q in zip(shown, demos):
        assert (question, answer) == (q.question, q.answers[0])
        assert sorted(texts) == sorted([_passage(q.passage_id), f"distractor of {q.qid}"])
        ranks.append(texts.index(_passage(q.passage_id)))
    assert set(ranks) == {0, 1}  # The gold's rank is drawn: position gives nothing away.
    with pytest.raises(ValueError, match="setting='oracle'"):
        in_context_qa.demonstration_exchanges(demos, "oracle")


class _Encoder:
    """A stand-in retriever: text -> one-hot of the synset id it names (none: zeros), so
    a question retrieves its own passage first."""

    def __init__(self, passages):
        self.passages = passages

    def embed(self, texts):
        out = np.zeros((len(texts), len(IDS)), np.float32)
        for row, text in enumerate(texts):
            for match in re.findall(r"n(\d{8})", text):
                out[row, int(match)] = 1.0
        return out


class _Tokenizer:
    eos_id, pad_id = 1, 0

    def apply_chat_template(self, messages):
        return "\n".join(f"<{m['role']}> {m['content']}" for m in messages)

    def encode(self, text):
        return list(range(len(text.split())))


def test_run_asks_every_query_with_the_same_demonstrations_in_its_setting(monkeypatch):
    """The wiring of `run`: per (setting, k) every query gets the same k demonstrations
    (training questions, in order), closed-book without passages, with retrieval the
    query's top-2 and each demonstration its gold passage plus a training-split KB
    distractor; a stand-in decoder answers in a sentence at k = 0, in a word after."""
    kb = {i: _passage(i) for i in IDS if split_of(i) != "validation"}
    test = _questions("test")
    train = _questions("train")
    calls = []

    def generate(self, questions, passages):
        for question, texts in zip(questions, passages):
            calls.append((len(self.demonstrations), question, list(texts),
                          chat_prompt.chat_messages(question, texts, self.demonstrations)))
        gold = {q.question: q.answers[0] for q in test}
        answers = [gold[q] if self.demonstrations else f"It is a {gold[q]}." for q in questions]
        return answers, [len(p) for p in passages]

    monkeypatch.setattr(ChatGenerator, "generate", generate)
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(max_len=10_000))
    generator = ChatGenerator(model, None, _Tokenizer(), max_new_tokens=8, batch_size=4)
    results = in_context_qa.run(generator, _Encoder(kb), {"test": test, "train": train},
                                {q.passage_id: _passage(q.passage_id) for q in train},
                                ks=(0, 1, 3), log=lambda line: None)

    assert [(r["setting"], r["k"]) for r in results["rows"]] == [
        (s, k) for s in ("closed_book", "retrieval") for k in (0, 1, 3)]
    assert results["retrieval"] == {"exact/recall@2": 1.0}
    demo_ids = results["demonstrations"][3]
    assert results["demonstrations"][1] == demo_ids[:1]
    train_by_id = {q.qid: q for q in train}
    assert all(qid in train_by_id for qid in demo_ids)
    assert len(calls) == 6 * len(test)
    for call, (setting, k) in zip(range(0, len(calls), len(test)),
                                  [(s, k) for s in in_context_qa.SETTINGS for k in (0, 1, 3)]):
        block = calls[call:call + len(test)]
        demo_turns = {tuple(m["content"] for m in messages[1:-1])
                      for _, _, _, messages in block}
        assert len(demo_turns) == 1  # The same demonstrations for every query.
        for shown_k, question, texts, messages in block:
            assert shown_k == k and len(messages) == 2 + 2 * k
            demos = [train_by_id[qid] for qid in demo_ids[:k]]
            assert [m["content"] for m in messages[2:-1:2]] == [d.answers[0] for d in demos]
            users = [m["content"] for m in messages[1::2]]
            assert users[-1].endswith(question)
            if setting == "closed_book":
                assert texts == [] and users == [d.question for d in demos] + [question]
                assert messages[0]["content"] == chat_prompt.SYSTEM_CLOSED_BOOK
                continue
            subject = next(q for q in test if q.question == question).passage_id
            assert len(texts) == 2 and texts[0] == _passage(subject)  # Its own, retrieved.
            for demo, user in zip(demos, users):
                numbered = re.findall(r"^\[(\d)\] (.*)$", user, re.M)
                assert [n for n, _ in numbered] == ["1", "2"], user
                assert user.endswith(f"\n\nQuestion: {demo.question}")
                shown = [text for _, text in numbered]
                assert _passage(demo.passage_id) in shown
                distractor, = [t for t in shown if t != _passage(demo.passage_id)]
                assert split_of(re.search(r"n\d{8}", distractor)[0]) == "train"
                assert distractor in kb.values()
    rows = {(r["setting"], r["k"]): r for r in results["rows"]}
    assert rows["closed_book", 0]["exact_match"]["mean"] == 0.0
    assert rows["closed_book", 0]["gold_contained"]["mean"] == 1.0
    assert rows["retrieval", 3]["exact_match"]["minus_k0"] == 1.0
    assert rows["retrieval", 3]["exact_match"]["minus_k0_interval"] == (1.0, 1.0)
    assert rows["retrieval", 3]["exact_match"]["minus_k0_p"] == pytest.approx(
        2 * 0.5 ** len(test))  # Every question discordant, all one way.
    assert [a["qid"] for a in rows["retrieval", 3]["answers"]] == [q.qid for q in test]


def test_an_index_s_vectors_replace_embedding_the_knowledge_base(monkeypatch):
    """rag_run passes its built index's (ids, vectors), in the index's own order: the
    prompts are the ones embedding every passage again gives, and nothing is embedded
    but the questions."""
    kb = {i: _passage(i) for i in IDS if split_of(i) != "validation"}
    test, train = _questions("test"), _questions("train")
    prompts = []

    def generate(self, questions, passages):
        prompts.extend(repr(chat_prompt.chat_messages(q, p, self.demonstrations))
                       for q, p in zip(questions, passages))
        return ["x"] * len(questions), [1] * len(questions)

    monkeypatch.setattr(ChatGenerator, "generate", generate)
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(max_len=10_000))
    generator = ChatGenerator(model, None, _Tokenizer(), max_new_tokens=8, batch_size=4)
    train_passages = {q.passage_id: _passage(q.passage_id) for q in train}
    args = (generator, None, {"test": test, "train": train}, train_passages)
    encoder = _Encoder(kb)
    fresh = in_context_qa.run(*args[:1], encoder, *args[2:], ks=(2,), log=lambda _: None)
    expected, prompts[:] = list(prompts), []
    order = sorted(kb, reverse=True)  # Not the sorted order run() uses.
    embedded_texts = []

    class Counting(_Encoder):
        def embed(self, texts):
            embedded_texts.extend(texts)
            return super().embed(texts)

    reused = in_context_qa.run(*args[:1], Counting(kb), *args[2:], ks=(2,),
                               log=lambda _: None,
                               embedded=(order, encoder.embed([kb[i] for i in order])))
    assert prompts == expected and len(expected) == 2 * len(test)
    assert reused["retrieval"] == fresh["retrieval"] == {"exact/recall@2": 1.0}
    assert not set(embedded_texts) & set(kb.values())  # Questions only.


def test_summary_intervals_wilson_for_proportions_bootstrap_for_f1():
    from scipy import stats

    rng = np.random.default_rng(3)
    scores = {"exact_match": list(rng.random(60) < 0.3), "f1": list(rng.random(60)),
              "gold_contained": [1.0] * 45 + [0.0] * 15}
    out = in_context_qa.summarise(scores)
    wilson = stats.binomtest(45, 60).proportion_ci(method="wilson")
    assert out["gold_contained"]["interval"] == pytest.approx(
        (wilson.low, wilson.high), abs=2e-4)  # z = 1.96 vs scipy's 1.95996.
    reference = stats.bootstrap((np.asarray(scores["f1"]),), np.mean, method="percentile",
                                n_resamples=20_000, random_state=0).confidence_interval
    assert out["f1"]["interval"] == pytest.approx((reference.low, reference.high), abs=0.01)
    assert out["count"] == 60 and "minus_k0" not in out["f1"]
