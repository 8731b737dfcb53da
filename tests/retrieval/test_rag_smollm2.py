"""Zero-shot RAG with SmolLM2-135M-Instruct (configs/rag.py:gen=smollm2): no training, the
retrieved passages numbered in a ChatML prompt. Over a small WordNet KB retrieval lifts
the real model's answers well above closed-book, and upserted passages are used at once.

Measured on this CPU (kb_size=400: 37 held-out hypernym questions, k=2, 16 new tokens,
greedy; about 3 minutes): gold contained closed-book 0.11, RAG 0.51, oracle 0.54; token F1
0.066 -> 0.173 (EM 0: the model answers in sentences, "A splashdown is a kind of a
landing."); new facts (12 questions) gold contained 0.08 before the upsert, 0.42 after.
The asserted margins are about half of those."""

import json
import os
import time

import pytest

from retrieval import chat_generator
from retrieval import rag as rag_lib
from train.tasks import chat_prompt


def test_chat_prompt_numbers_passages_and_closed_book_has_none():
    messages = chat_prompt.chat_messages("What is a poodle a kind of?",
                                            ["poodle: a dog. A kind of: dog.", "cat: a cat."])
    assert messages[0]["content"] == chat_prompt.SYSTEM_WITH_PASSAGES
    assert messages[1]["content"] == ("[1] poodle: a dog. A kind of: dog.\n[2] cat: a cat."
                                      "\n\nQuestion: What is a poodle a kind of?")
    closed = chat_prompt.chat_messages("What is a poodle a kind of?", [])
    assert closed[1]["content"] == "What is a poodle a kind of?"
    assert "passages" not in closed[0]["content"]
    assert chat_generator.clean_answer("  Dog [1].\nMore text") == "Dog."
    assert chat_generator.clean_answer("\n\n") == ""


@pytest.fixture(scope="module")
def smol_tokenizer():
    from model import gguf
    from train.data.tokenizer import GGUFBPETokenizer

    return GGUFBPETokenizer(gguf.resolve_path("gguf:smollm2"))


def test_chat_training_rows_are_the_prompts_asked_at_test_time(smol_tokenizer):
    """RAFT on ChatML prompts (data.prompt_format="chat"): the prompt part of a training
    row is token for token what ChatGenerator asks, and only the answer and its
    end-of-turn token carry loss."""
    from train.tasks import prefix_lm_examples

    tok = smol_tokenizer
    example = {"question": "What is a poodle a kind of?", "answer": "dog",
               "passages": ["poodle: an intelligent dog with a curly coat. A kind of: dog.",
                            "trout: a fish. A kind of: fish."]}
    batch = prefix_lm_examples.EncodePrefixLM(tok, 128, 12, "chat").map([example])
    weights = batch["target_weights"][0]
    assert tok.decode(batch["targets"][0][weights > 0], skip_special=False) == "dog<|im_end|>"
    prompt_len = int(batch["prefix_mask"][0].sum())
    asked = tok.encode(tok.apply_chat_template(chat_prompt.chat_messages(
        example["question"], example["passages"])))
    assert list(batch["tokens"][0][:prompt_len]) == asked
    assert tok.decode(asked, skip_special=False).endswith("<|im_start|>assistant\n")
    assert weights[:prompt_len - 1].sum() == 0 and weights.sum() == 2  # "dog", <|im_end|>.


def test_chat_rows_drop_whole_passages_and_never_cut_the_question(smol_tokenizer):
    from train.tasks import prefix_lm_examples

    tok = smol_tokenizer
    long = "a word " * 40
    example = {"question": "What is a poodle a kind of?", "answer": "dog",
               "passages": ["poodle: a dog. A kind of: dog.", long]}
    row, prompt_len, used = prefix_lm_examples.encode_chat_example(tok, example, 96, 8)
    assert used == 1 and len(row) <= 96  # The long passage went whole; the first stayed.
    assert "A kind of: dog." in tok.decode(row[:prompt_len]) and "a word" not in \
        tok.decode(row)
    with pytest.raises(ValueError, match="config.data.seq_len=24"):
        prefix_lm_examples.encode_chat_example(tok, example, 24, 8)


def test_rag_config_fine_tunes_the_chat_decoder_on_chat_prompts():
    from configs import rag as rag_config
    from train.tasks import registry

    config = rag_config.get_config("runlocal,gen=smollm2,method=lora,lora_rank=4")
    assert (config.rag.generator, config.init_from) == ("", "gguf:smollm2")
    assert config.data.prompt_format == "chat" and config.data.tokenizer == "gguf"
    assert config.model.lora_rank == 4 and config.model.num_kv_heads == 3
    registry.get_task("prefix_lm").check(config)  # The generator's start-up checks pass.
    config.data.tokenizer = "sentencepiece"
    with pytest.raises(ValueError, match="config.data.prompt_format='chat' needs"):
        registry.get_task("prefix_lm").check(config)
    with pytest.raises(ValueError, match="name one with gen="):
        rag_config.get_config("runlocal,method=lora")


def test_gold_contained_is_case_insensitive_and_whole_words():
    assert rag_lib.gold_contained("A poodle is a kind of Dog.", ["dog"]) == 1.0
    assert rag_lib.gold_contained("a hotdog", ["dog"]) == 0.0
    assert rag_lib.gold_contained("a Domestic  dog", ["cat", "domestic dog"]) == 1.0
    scores = rag_lib.score_answers([rag_lib.Answer("q", "It is a dog.", [])], [["dog"]])
    assert scores["gold_contained"] == 1.0 and scores["exact_match"] == 0.0


@pytest.mark.slow
def test_zero_shot_smollm2_rag_beats_closed_book_and_uses_new_facts(tmp_path,
                                                                    wordnet_files_dir):
    from configs import rag as rag_config
    from retrieval import rag_run

    config = rag_config.get_config("runlocal,gen=smollm2")
    assert config.rag.generator == "gguf:smollm2"
    config.data.wordnet_dir = str(wordnet_files_dir)
    # "retrieved" distractors: only the KB's passages are read for the (unused) training split.
    # Hypernym questions: the measured margins above are theirs (gloss questions, which
    # the config also asks, are much harder zero-shot).
    config.rag.update(question_kinds=("hypernym",),
                      kb_size=400, max_eval_questions=40, new_info_passages=12,
                      max_train_questions=100, train_distractors="retrieved",
                      generator_max_new_tokens=16, generator_max_len=256,
                      encode_batch_size=64, decode_batch_size=20)
    workdir = str(tmp_path / "rag_smollm2")
    start = time.perf_counter()
    results = rag_run.run(config, workdir)
    print(json.dumps({m: {k: results[m][k] for k in ("exact_match", "f1", "gold_contained",
                                                      "questions_per_s")}
                      for m in ("closed_book", "rag_exact", "rag_index", "oracle")}
                     | {"new_information": results["new_information"],
                        "seconds": time.perf_counter() - start}, indent=1))

    assert not os.path.exists(os.path.join(workdir, "generator"))  # Nothing trained.
    saved = json.load(open(os.path.join(workdir, "results.json")))
    assert saved["generator"] | {} == results["generator"]
    assert results["generator"]["spec"] == "gguf:smollm2"
    assert results["generator"]["zero_shot"] is True
    closed, rag, oracle = (results[m] for m in ("closed_book", "rag_exact", "oracle"))
    assert closed["count"] == rag["count"] > 20
    assert rag["gold_contained"] - closed["gold_contained"] > 0.2, results
    assert rag["f1"] - closed["f1"] > 0.05, results
    assert oracle["gold_contained"] >= rag["gold_contained"] - 0.1
    new = results["new_information"]  # No weight update between before and after.
    assert new["questions"] > 0
    assert new["after"]["gold_passage_cited"] > new["before"]["gold_passage_cited"]
    assert new["after"]["gold_contained"] - new["before"]["gold_contained"] > 0.15, new


@pytest.mark.parametrize("field,value,message", [
    ("k", 5, "config.rag.k=5; expected 1 <= k"),
    ("k", 0, "config.rag.k=0"),
    ("generator_strategy", "beam", "config.rag.generator_strategy='beam'"),
    ("generator_top_p", 0.0, "generator_top_p=0.0"),
    ("in_context_k", -1, "config.rag.in_context_k=-1"),
])
def test_bad_rag_settings_fail_at_start_up_naming_the_key(field, value, message):
    from configs import rag as rag_config
    from train.tasks import registry

    config = rag_config.get_config("runlocal,gen=smollm2")
    config.rag.kb_size = 4
    registry.get_task("rag").check(config)
    config.rag[field] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        registry.get_task("rag").check(config)


def test_in_context_learning_needs_a_chat_generator():
    from configs import rag as rag_config
    from train.tasks import registry

    config = rag_config.get_config("runlocal")  # The prefix-LM generator RAG trains.
    config.rag.in_context_k = 3
    with pytest.raises(ValueError, match="in_context_k=3.*zero-shot chat generator"):
        registry.get_task("rag").check(config)


def test_masked_lm_on_a_decoder_tokenizer_is_refused_by_name():
    from configs import pretrain_mlm
    from train.tasks import registry

    config = pretrain_mlm.get_config("runlocal")
    config.data.tokenizer = "gguf"
    with pytest.raises(ValueError, match="config.data.tokenizer='gguf'.*has none"):
        registry.get_task("mlm").check(config)
