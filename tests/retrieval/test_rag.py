"""RAG on WordNet: the question generator, prompt packing, the scores, and a tiny run where
retrieval beats closed-book on held-out facts."""

import json
import os
import types

import numpy as np
import pytest

from retrieval import rag as rag_lib
from retrieval import wordnet_qa
from train.data.wordnet import Synset
from train.tasks import prefix_lm_examples as prefix_lm


def synset(sid, lemmas, gloss, hypernyms=(), pos="n"):
    return Synset(synset_id=sid, pos=pos, ss_type=pos, lexname=0, lemmas=list(lemmas),
                  gloss=gloss, examples=[], hypernyms=list(hypernyms))


def toy_wordnet():
    synsets = [
        synset("n1", ["animal"], "a living organism"),
        synset("n2", ["dog", "domestic dog"], "a member of the genus Canis", ["n1"]),
        synset("n3", ["poodle"], "an intelligent dog with a thick coat", ["n2"]),
        # "bank" names two synsets: no "What is a bank a kind of?" question.
        synset("n4", ["bank"], "sloping land beside water", ["n1"]),
        synset("n5", ["bank"], "a financial institution", ["n1"]),
        # Two hypernyms: two right answers, so not asked.
        synset("n6", ["mule"], "hybrid offspring of a male donkey and a female horse",
               ["n1", "n2"]),
        # The same gloss twice: "Which word means ...?" is ambiguous for both.
        synset("n7", ["hound"], "a hunting dog", ["n2"]),
        synset("n8", ["hunting dog"], "a hunting dog", ["n2"]),
        synset("v1", ["bark"], "make barking sounds", pos="v"),
    ]
    return {s.synset_id: s for s in synsets}


def test_questions_are_answered_by_exactly_one_passage():
    synsets = toy_wordnet()
    kb = wordnet_qa.build_knowledge_base(synsets)
    questions = {q.qid: q for q in wordnet_qa.generate_questions(synsets)}
    assert questions["n3-hypernym"].question == "What is a poodle a kind of?"
    assert questions["n3-hypernym"].answers == ("dog", "domestic dog")
    assert questions["n2-hypernym"].answers == ("animal",)
    assert questions["v1-gloss"].question == 'Which word means "make barking sounds"?'
    assert questions["v1-gloss"].answers == ("bark",)
    # Ambiguous ones are dropped: a shared lemma, two hypernyms, a shared gloss.
    for dropped in ("n4-hypernym", "n5-hypernym", "n6-hypernym", "n7-gloss", "n8-gloss",
                    "v1-hypernym"):
        assert dropped not in questions
    for q in questions.values():
        assert wordnet_qa.passages_stating(q, kb) == [q.passage_id], q
        assert any(a in kb.passages[q.passage_id] for a in q.answers)
    assert kb.passages["n3"] == ("poodle: an intelligent dog with a thick coat. "
                                 "A kind of: dog.")


def test_real_wordnet_questions_are_unambiguous_and_split_by_synset(wordnet_files_dir):
    synsets = wordnet_qa.load_synsets(wordnet_files_dir)
    questions = wordnet_qa.generate_questions(synsets)
    kb = wordnet_qa.build_knowledge_base(synsets)
    assert len(questions) > 100_000
    rng = np.random.default_rng(0)
    for i in rng.choice(len(questions), 20, replace=False):
        q = questions[i]
        assert wordnet_qa.passages_stating(q, kb) == [q.passage_id]
        assert q.split == wordnet_qa.wordnet.split_of(q.passage_id)
        assert all(len(a.split()) <= wordnet_qa.MAX_ANSWER_WORDS for a in q.answers)


def test_packing_never_truncates_the_question():
    question, passages = list(range(100, 110)), [list(range(200, 240)), list(range(300, 330))]
    prompt, used = prefix_lm.pack_prompt(question, passages, budget=32, cls_id=2, sep_id=3)
    assert prompt[:12] == [2, *question, 3]  # The whole question, first.
    assert len(prompt) == 32 and prompt[-1] == 3
    assert prompt[12:31] == passages[0][:19] and used == 1  # The passage is what is cut.
    # Room for both: both whole, in order.
    prompt, used = prefix_lm.pack_prompt(question, passages, budget=200, cls_id=2, sep_id=3)
    assert prompt == [2, *question, 3, *passages[0], 3, *passages[1], 3] and used == 2
    # A question longer than the budget is an error, never cut.
    with pytest.raises(ValueError, match="never truncated"):
        prefix_lm.pack_prompt(list(range(40)), passages, budget=32, cls_id=2, sep_id=3)


def test_prefix_lm_batch_weights_only_the_answer():
    class Tok:  # One piece per word: ids are word lengths + 10.
        pad_id, cls_id, sep_id = 0, 2, 3

        def encode(self, text):
            return [10 + len(w) for w in text.split()]

        def encode_batch(self, texts):
            return [self.encode(t) for t in texts]

    examples = [{"question": "q qq", "passages": ["ppp pppp", "xxxxx"], "answer": "a aa"}]
    batch = prefix_lm.EncodePrefixLM(Tok(), seq_len=16, max_answer_tokens=3).map(examples)
    prompt = [2, 11, 12, 3, 13, 14, 3, 15, 3]
    assert batch["tokens"][0].tolist() == prompt + [11, 12, 3] + [0] * 4
    assert batch["prefix_mask"][0].tolist() == [True] * 9 + [False] * 7
    # Positions 8..10 predict the answer's two tokens and its [SEP].
    assert np.flatnonzero(batch["target_weights"][0]).tolist() == [8, 9, 10]
    assert batch["targets"][0, 8:11].tolist() == [11, 12, 3]


def test_exact_match_and_f1_against_hand_computed_values():
    assert rag_lib.normalize_answer("The  Domestic-Dog!") == "domesticdog"
    assert rag_lib.exact_match("a dog", ["dog"]) == 1.0
    assert rag_lib.exact_match("dogs", ["dog"]) == 0.0
    # "big red dog" vs "red dog": common 2, precision 2/3, recall 1 -> F1 0.8.
    assert rag_lib.token_f1("big red dog", ["red dog"]) == pytest.approx(0.8)
    # Best over the answers: vs "cat" 0, vs "domestic dog" P=1/2 R=1/2 -> 0.5.
    assert rag_lib.token_f1("dog house", ["cat", "domestic dog"]) == pytest.approx(0.5)
    assert rag_lib.token_f1("", ["dog"]) == 0.0
    answers = [rag_lib.Answer("q", "red dog", []), rag_lib.Answer("q", "cat", [])]
    scores = rag_lib.score_answers(answers, [["big red dog"], ["cat"]])
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx((0.8 + 1.0) / 2)
    assert rag_lib.recall_at_k([["a", "b"], ["c", "d"]], ["b", "e"]) == 0.5


class _PromptEcho:
    """A generator whose answer spells its prompt, and which records every prompt it
    decodes: what `Rag` reuses must be what decoding that prompt gives."""

    def __init__(self, strategy="greedy"):
        self.decode_config = types.SimpleNamespace(strategy=strategy)
        self.decoded = []

    def generate(self, questions, passages):
        self.decoded += [(q, tuple(p)) for q, p in zip(questions, passages)]
        return [f"{q}|{'+'.join(p)}" for q, p in zip(questions, passages)], \
            [len(p) for p in passages]


def test_a_prompt_decoded_once_is_reused_only_where_asked_and_only_when_greedy():
    passages = {"a": "alpha", "b": "beta", "c": "gamma"}
    questions = ["q1", "q2", "q3"]
    index_hits, exact_hits = [["a", "b"], ["b", "c"], ["c", "a"]], [["a", "b"], ["c", "b"],
                                                                   ["c", "a"]]
    gen = _PromptEcho()
    rag = rag_lib.Rag(types.SimpleNamespace(passages=passages), gen)
    first = rag.answer_with(questions, index_hits)
    assert len(gen.decoded) == 3 and not any(a.reused for a in first)
    scores = [[0.9, 0.5], [0.8, 0.7], [0.6, 0.1]]
    second = rag.answer_with(questions, exact_hits, scores, reuse=True)
    # Only q2's passages differ (order counts: it is the prompt's order).
    assert gen.decoded[3:] == [("q2", ("gamma", "beta"))]
    assert [a.reused for a in second] == [True, False, True]
    fresh = rag_lib.Rag(types.SimpleNamespace(passages=passages), _PromptEcho())
    expected = fresh.answer_with(questions, exact_hits, scores)
    assert [(a.answer, a.citations) for a in second] == \
        [(a.answer, a.citations) for a in expected]
    # Without reuse=True every prompt is decoded again.
    rag.answer_with(questions, exact_hits)
    assert len(gen.decoded) == 3 + 1 + 3

    sampled = _PromptEcho(strategy="sample")  # A sample is not the prompt's one answer.
    rag = rag_lib.Rag(types.SimpleNamespace(passages=passages), sampled)
    rag.answer_with(questions, index_hits)
    again = rag.answer_with(questions, index_hits, reuse=True)
    assert len(sampled.decoded) == 6 and not any(a.reused for a in again)


def test_raft_examples_keep_or_remove_the_answer_passage():
    from retrieval.rag_run import raft_examples

    qs = [wordnet_qa.Question(f"q{i}", "gloss", f"Q{i}?", ("a",), f"p{i}", "train")
          for i in range(200)]
    passages = {f"p{i}": f"text {i}" for i in range(210)}
    # Retrieval put the gold passage second for every question.
    rows = [[f"p{i + 1}", f"p{i}", f"p{i + 2}", f"p{i + 3}"] for i in range(200)]
    with_gold = raft_examples(qs, rows, passages, 3, 0.0, 0.0, seed=0)
    assert all(e["passage_ids"] == [f"p{i + 1}", f"p{i}", f"p{i + 2}"]
               for i, e in enumerate(with_gold))  # Gold kept at its retrieved rank.
    only_distractors = raft_examples(qs, rows, passages, 3, 1.0, 0.0, seed=0)
    assert all(f"p{i}" not in e["passage_ids"] and len(e["passage_ids"]) == 3
               for i, e in enumerate(only_distractors))
    mixed = raft_examples(qs, rows, passages, 3, 0.3, 0.1, seed=0)
    no_gold = np.mean([f"p{i}" not in e["passage_ids"] for i, e in enumerate(mixed)])
    empty = np.mean([not e["passage_ids"] for e in mixed])
    assert 0.3 < no_gold < 0.5 and 0.03 < empty < 0.2  # 0.4 and 0.1 expected.
    assert all(e["passages"] == [passages[i] for i in e["passage_ids"]] for e in mixed)


@pytest.mark.slow
def test_tiny_rag_run_beats_closed_book_and_learns_new_facts(tmp_path, wordnet_files_dir):
    from configs import rag as rag_config
    from retrieval import rag_run

    config = rag_config.get_config("runlocal")  # Hypernym questions, RAFT, random distractors.
    config.data.wordnet_dir = str(wordnet_files_dir)
    config.data.tokenizer_sample = 20_000
    config.model.max_len = config.data.seq_len = 64
    config.data.max_answer_tokens = 6
    # RoPE, pre-LN, no dropout: as good after 600 steps as the learned table after 1,000.
    config.model.update(position_embedding="rope", norm="pre", dropout=0.0,
                        attention_dropout=0.0)
    config.train.num_steps = 600
    config.train.eval_every = config.train.checkpoint_every = 600
    config.train.log_every = 200
    config.train.eval_steps = config.train.final_eval_steps = 1
    config.rag.update(kb_size=400, max_train_questions=30_000, max_eval_questions=96,
                      new_info_passages=16, distractor_fraction=0.0, no_context_fraction=0.0,
                      encode_batch_size=32, decode_batch_size=48)
    workdir = str(tmp_path / "rag")
    results = rag_run.run(config, workdir)

    assert os.path.isfile(os.path.join(workdir, "results.json"))
    assert json.load(open(os.path.join(workdir, "results.json")))["rag_exact"]["count"] == \
        results["closed_book"]["count"] > 0
    assert results["retrieval"]["exact/recall@2"] > 0.8
    closed, rag = results["closed_book"], results["rag_exact"]
    assert rag["f1"] > closed["f1"] or rag["exact_match"] > closed["exact_match"], results
    new = results["new_information"]  # No training between before and after.
    assert new["questions"] > 0
    assert new["after"]["gold_passage_cited"] > new["before"]["gold_passage_cited"]
    assert new["after"]["f1"] >= new["before"]["f1"], new

    # launch.ask's path: the saved index and generator answer with citations.
    rag_pipeline, _ = rag_run.load_rag(workdir)
    (answer,) = rag_pipeline.answer(["What is a poodle a kind of?"], k=2)
    assert len(answer.citations) >= 1 and all(s is not None for _, s in answer.citations)


def test_pretrained_bert_generator_config_loads_minilm():
    """`configs/rag.py:hf=minilm`: MiniLM's weights and WordPiece vocabulary start the
    prefix-LM generator (UniLM's recipe): every generator parameter loads, shape for
    shape, and the architecture check passes."""
    import jax

    from configs import common
    from configs import rag as rag_config
    from train import model_setup
    from train.data import tokenizer as tokenizers
    from train.init_from import check_hf_model_config, load_params
    from train.param_rules import path_string

    config = rag_config.get_config("runlocal,hf=minilm")
    assert config.init_from == "hf:minilm"
    assert {k: config.model[k] for k in common.PRETRAINED["minilm"]} == \
        common.PRETRAINED["minilm"]
    assert config.model.attention_mask == "prefix" and tuple(config.model.heads) == ("lm",)
    check_hf_model_config(config)
    tok = tokenizers.get_tokenizer(config.data)
    assert tok.vocab_size == config.model.vocab_size == 30522
    assert tok.unk_id not in tok.encode("What is a poodle a kind of?")
    loaded, _ = load_params(config.init_from)
    shapes = jax.tree_util.tree_flatten_with_path(model_setup.abstract_params(
        model_setup.build_model(config), config.data.seq_len))[0]
    assert len(shapes) > 90
    for path, leaf in shapes:
        assert loaded[path_string(path)].shape == leaf.shape, path_string(path)


def test_in_context_settings_must_name_known_settings():
    import ml_collections

    from retrieval.rag_run import check_in_context_settings

    rc = ml_collections.ConfigDict({"in_context_settings": ("closed_book",)})
    assert check_in_context_settings(rc) == ("closed_book",)
    for bad in (("sideways",), ()):
        rc.in_context_settings = bad
        with pytest.raises(ValueError, match="config.rag.in_context_settings"):
            check_in_context_settings(rc)
