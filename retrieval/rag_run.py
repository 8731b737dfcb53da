"""The RAG stage end to end (`config.task = "rag"`, configs/rag.py), called by launch.main.

    W/config.json        the resolved config
    W/tokenizer.model    the generator's sentencepiece model (unless data.tokenizer_path /
                         init_from name one)
    W/index/             the knowledge base's ScaNN (or exact) index with passage texts and
                         the encoder's fingerprint (retrieval/index_store.py)
    W/qa/*.jsonl         generator examples: question, retrieved passages, answer
    W/generator/         the generator's run (the normal train loop, task "prefix_lm")
    W/results.json       EM / F1 closed-book, RAG (exact, ScaNN), oracle, and with
                         `rag.reretrieve_every` > 0 RAG re-retrieving during decoding
                         ("rag_reretrieve"); recall@k; the new-information experiment;
                         timings. Written last (atomically, by process 0): it marks the
                         run finished

Stages (`run` calls them in order):
1. `knowledge_base`: passages and questions (retrieval/wordnet_qa.py), split by synset.
2. `build_or_load_index`: every passage embedded with the retriever encoder
   (all-MiniLM-L6-v2) and indexed, or the saved index loaded (one from another encoder
   or knowledge base is refused).
3. `generator_data`: the tokenizer, the questions that fit the prompt, and the generator
   examples, RAFT style: each training question with k passages: its own and
   distractors, either retrieved (`train_distractors="retrieved"`: top-k from an index of
   the KB's *training-split* passages; the answer passage at its retrieved rank, or a
   random one where retrieval missed it) or sampled (`"random"`, as RAFT: random
   training passages, so questions can come from every training synset without
   embedding them). A `distractor_fraction` of examples has the answer passage removed
   (k distractors), a `no_context_fraction` has no passages at all.
4. `train_generator`: train.loop (or resumes / loads when already trained). Preempted
   (SIGTERM), the run stops here without results.json; running it again resumes.
5. `new_information`: the passages of some test questions are deleted from the index,
   the questions answered (before), the passages embedded and upserted with no
   training, the questions answered (after).
6. `evaluate_retrieval`, `evaluate_answers`: held-out (test-split) questions.

With `config.rag.generator` = "gguf:smollm2" (configs/rag.py:gen=smollm2) stages 3-4 are
skipped: a pre-trained chat decoder answers zero-shot from a ChatML prompt holding the
numbered passages (retrieval/chat_generator.py), and results.json adds
"generator": {"spec": ..., "zero_shot": true}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time

import ml_collections
import numpy as np

from retrieval import rag as rag_lib
from retrieval import wordnet_qa
from retrieval.exact import ExactIndex
from retrieval.index import build_index
from retrieval.index_config import IndexConfig
from retrieval.index_store import encoder_fingerprint, load_index, save_index
from train.data import tokenizer as tokenizers
from train.embedding import load_encoder, unflatten
from train.run_files import atomic_write_json, write_results
from train.tasks import prefix_lm_examples as prefix_lm

log = logging.getLogger("strata")


# --- Knowledge base and questions ---------------------------------------------------------

def knowledge_base(config, rc=None):
    """-> (passages {id: text} of the KB (the index), questions {split: [Question]},
    training passages {id: text}: the training questions' own and the distractor pool).

    Held-out questions are about KB synsets. With `train_distractors="random"` training
    questions come from every training-split synset (their passages need no embedding);
    with "retrieved" only from the KB's (their distractors are retrieved from it).
    `rc`: the section holding kb_size, question_kinds, ... (default config.rag; the
    retriever stage passes config.retriever).
    """
    rc = config.rag if rc is None else rc
    if rc.train_distractors not in ("retrieved", "random"):
        raise ValueError(f"config.rag.train_distractors={rc.train_distractors!r}; expected "
                         f"'retrieved' or 'random'")
    synsets = wordnet_qa.load_synsets(wordnet_qa.wordnet_dir_of(config))
    questions = wordnet_qa.generate_questions(synsets)
    # A smaller KB (runlocal, tests): synsets that some question is about, chosen by hash.
    asked = sorted({q.passage_id for q in questions if q.kind in rc.question_kinds})
    kb_ids = set(wordnet_qa.subsample(asked, rc.kb_size, "kb") if rc.kb_size > 0
                 else synsets)
    passages = {i: wordnet_qa.passage_text(synsets[i], synsets) for i in sorted(kb_ids)}
    train_ids = kb_ids if rc.train_distractors == "retrieved" else set(synsets)
    train_passages = {i: passages.get(i) or wordnet_qa.passage_text(synsets[i], synsets)
                      for i in sorted(train_ids) if wordnet_qa.wordnet.split_of(i) == "train"}
    by_split = {}
    for split, limit in (("train", rc.max_train_questions),
                         ("validation", rc.max_eval_questions),
                         ("test", rc.max_eval_questions)):
        allowed = train_passages if split == "train" else kb_ids
        pool = {q.qid: q for q in questions if q.split == split and q.passage_id in allowed
                and q.kind in rc.question_kinds}
        by_split[split] = [pool[i] for i in wordnet_qa.subsample(pool, limit, split)]
    return passages, by_split, train_passages


# --- Generator examples (RAFT) ------------------------------------------------------------

def raft_examples(questions, retrieved_ids, passages, k, distractor_fraction,
                  no_context_fraction, seed):
    """Training examples: questions [n], retrieved ids [n, >= k + 1] best first."""
    rng = np.random.default_rng(seed)
    examples = []
    for question, row in zip(questions, retrieved_ids):
        row = [str(i) for i in row]
        distractors = [i for i in row if i != question.passage_id][:k]
        draw = rng.random()
        if draw < no_context_fraction:
            ids = []
        elif draw < no_context_fraction + distractor_fraction:
            ids = distractors  # The answer passage removed: learn to ignore the context.
        else:
            rank = row.index(question.passage_id) if question.passage_id in row[:k] \
                else int(rng.integers(0, k))
            ids = distractors[:k - 1]
            ids.insert(min(rank, len(ids)), question.passage_id)
        examples.append({"qid": question.qid, "question": question.question,
                         "passage_ids": ids, "passages": [passages[i] for i in ids],
                         "answer": question.answers[0]})
    return examples


def eval_examples(questions, retrieved_ids, passages, k):
    return [{"qid": q.qid, "question": q.question, "passage_ids": [str(i) for i in row[:k]],
             "passages": [passages[str(i)] for i in row[:k]], "answer": q.answers[0]}
            for q, row in zip(questions, retrieved_ids)]


# --- Pieces launch.ask reuses -------------------------------------------------------------

def generator_config(config, workdir):
    """The generator's train config: the RAG config as task "prefix_lm"."""
    gen = ml_collections.ConfigDict(config.to_dict())
    gen.task = "prefix_lm"
    gen.data.qa_dir = os.path.join(workdir, "qa")
    return gen


def load_generator(gen_workdir):
    """A trained generator run -> rag.Generator (greedy, batched)."""
    from train import model_setup
    from train.init_from import load_params

    with open(os.path.join(gen_workdir, "config.json")) as f:
        gen = ml_collections.ConfigDict(json.load(f))
    # A chat decoder fine-tuned on ChatML prompts (runs recorded before the key: plain).
    if gen.data.get("prompt_format", "plain") == "chat":
        from retrieval.chat_generator import ChatGenerator

        return ChatGenerator.from_workdir(gen_workdir, **chat_decoding(gen))
    flat, _ = load_params(gen_workdir)
    params = unflatten(flat)
    model = model_setup.build_model(gen)
    tok = tokenizers.get_tokenizer(gen.data)
    return rag_lib.Generator(model, params, tok, gen.data.seq_len, gen.data.max_answer_tokens,
                             batch_size=gen.rag.decode_batch_size)


def load_rag(workdir) -> tuple[rag_lib.Rag, ml_collections.ConfigDict]:
    """A finished RAG workdir -> (Rag over its saved index, its config)."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    encoder = load_encoder(config.rag.encoder)
    saved = load_index(os.path.join(workdir, "index"),
                       expected_fingerprint=encoder_fingerprint(encoder[0]))
    retriever = rag_lib.Retriever(encoder, saved.index, saved.passages,
                                  batch_size=config.rag.encode_batch_size)
    if config.rag.get("generator"):  # Zero-shot: the chat decoder, as the run used it.
        return rag_lib.Rag(retriever, chat_generator(config)), config
    return rag_lib.Rag(retriever, load_generator(os.path.join(workdir, "generator")),
                       reretrieve_every=config.rag.reretrieve_every), config


def _tokenizer_path(config, workdir, passages, train_questions):
    """data.tokenizer_path, else init_from's tokenizer, else one fitted here on the
    training split's passages and questions (never on held-out synsets)."""
    if config.data.tokenizer_path:
        return config.data.tokenizer_path
    if config.init_from and not config.init_from.startswith("hf:"):
        with open(os.path.join(config.init_from, "config.json")) as f:
            init_data = ml_collections.ConfigDict(json.load(f)["data"])
        return str(tokenizers.tokenizer_path(init_data))
    path = os.path.join(workdir, "tokenizer.model")
    if not os.path.isfile(path):
        from train.data.wordnet import split_of

        train_ids = [i for i in passages if split_of(i) == "train"]
        texts = [passages[i] for i in wordnet_qa.subsample(
            train_ids, config.data.tokenizer_sample, "tokenizer")]  # All parts of speech.
        texts += [q.question + " " + q.answers[0] for q in train_questions]
        tokenizers.train_tokenizer(texts, path, config.data.vocab_size)
    return path


def _progress_log(what: str, total: int, every_s: float = 30.0):
    """-> progress(done, elapsed_s) that logs rate and ETA at most every `every_s`
    (embedding the whole KB takes half an hour on a laptop CPU)."""
    last = [0.0]

    def progress(done, elapsed):
        if elapsed - last[0] >= every_s or done == total:
            last[0] = elapsed
            rate = done / max(elapsed, 1e-9)
            log.info("%s: %s/%s (%.0f/s, ETA %.0f s)", what, f"{done:,}", f"{total:,}",
                     rate, (total - done) / max(rate, 1e-9))
    return progress


# --- The run, stage by stage --------------------------------------------------------------

@contextlib.contextmanager
def timed(timings: dict, key: str):
    """`timings[key]` = the seconds the `with` block took (set when it finishes)."""
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


def run(config, workdir):
    """Builds / loads everything, evaluates, writes W/results.json; returns the results.

    Preempted (SIGTERM) while the generator trains: returns the loop's
    {"preempted_at_step": step} and writes no results.json, so a re-run (or a sweep, which
    counts a trial with results.json as finished) resumes from the generator's checkpoint.
    """
    rc, timings = config.rag, {}
    if rc.reretrieve_every < 0:  # Before the hours of training, not after.
        raise ValueError(f"config.rag.reretrieve_every={rc.reretrieve_every}; expected >= 0 "
                         f"(0 = off)")
    if rc.generator and rc.reretrieve_every:
        raise ValueError(f"config.rag.reretrieve_every={rc.reretrieve_every} needs the "
                         f"trained generator; config.rag.generator={rc.generator!r} answers "
                         f"in one round (set reretrieve_every=0)")
    os.makedirs(workdir, exist_ok=True)
    with timed(timings, "knowledge_base_s"):
        passages, questions, train_passages = knowledge_base(config)
    log.info("Knowledge base: %d passages; questions %s", len(passages),
             {s: len(q) for s, q in questions.items()})
    retriever, index = build_or_load_index(config, workdir, passages, timings)
    if rc.k > len(index):  # Before the generator trains, not after.
        raise ValueError(f"config.rag.k={rc.k} exceeds the {len(index)} passages of the "
                         f"knowledge base's index; use a smaller k or a larger "
                         f"config.rag.kb_size")
    exact = ExactIndex(index.vectors, index.ids)
    if rc.generator:  # A pre-trained chat decoder, zero-shot: nothing to fit or train.
        return _run_zero_shot(config, workdir, retriever, index, exact, passages, questions,
                              train_passages, timings)
    gen, questions, too_long, question_vectors = generator_data(
        config, workdir, retriever, exact, passages, questions, train_passages, timings)
    gen_results = train_generator(gen, workdir, timings)
    if "preempted_at_step" in gen_results:  # Checkpointed; not finished.
        return gen_results
    atomic_write_json(os.path.join(workdir, "config.json"), gen.to_dict() | {"task": "rag"})
    rag = rag_lib.Rag(retriever, load_generator(os.path.join(workdir, "generator")))

    # New information before the main evaluation: it needs the index without the held-out
    # passages, and leaves it whole again.
    new_info = new_information(rag, retriever, index, passages, questions["test"], rc)
    retrieval, hits = evaluate_retrieval(index, exact, question_vectors["test"],
                                         questions["test"], rc.k, timings)
    scores, samples = evaluate_answers(rag, questions["test"], hits, rc, timings)
    results = {
        "knowledge_base": {"passages": len(passages),
                           "questions": {s: len(q) for s, q in questions.items()},
                           "questions_too_long_dropped": too_long},
        "retrieval": retrieval, **scores, "new_information": new_info,
        "generator": {key: gen_results.get(key) for key in
                      ("step", "train_time_s", "validation", "test", "parameters")}
        | {"init_from": gen.init_from, "prompt_format": gen.data.prompt_format},
        "timings": timings, "samples": samples,
    }
    return write_results(workdir, results)


def chat_generator(config):
    """config.rag.generator (`gguf:<alias|path>`) -> the zero-shot ChatGenerator."""
    from retrieval.chat_generator import ChatGenerator

    rc = config.rag
    return ChatGenerator.from_spec(rc.generator, max_len=rc.generator_max_len,
                                   **chat_decoding(config))


def chat_decoding(config) -> dict:
    """The chat generator's decoding arguments from config.rag (and config.seed)."""
    rc = config.rag
    return dict(max_new_tokens=rc.generator_max_new_tokens, batch_size=rc.decode_batch_size,
                strategy=rc.generator_strategy, temperature=rc.generator_temperature,
                top_p=rc.generator_top_p, seed=config.seed)


def _run_zero_shot(config, workdir, retriever, index, exact, passages, questions,
                   train_passages, timings):
    """Stages 5-6 with a pre-trained chat decoder answering from its prompt (no tokenizer
    fitting, no generator data, no training) -> results.json's sections, plus
    "generator": {"spec", "zero_shot": true}, and with config.rag.in_context_k the same
    questions answered k-shot ("in_context")."""
    rc = config.rag
    with timed(timings, "generator_load_s"):
        rag = rag_lib.Rag(retriever, chat_generator(config))
    atomic_write_json(os.path.join(workdir, "config.json"), config.to_dict())
    test_q = questions["test"]
    with timed(timings, "embed_questions_s"):
        test_vectors = retriever.embed([q.question for q in test_q])
    new_info = new_information(rag, retriever, index, passages, test_q, rc)
    retrieval, hits = evaluate_retrieval(index, exact, test_vectors, test_q, rc.k, timings)
    scores, samples = evaluate_answers(rag, test_q, hits, rc, timings)
    results = {
        "knowledge_base": {"passages": len(passages),
                           "questions": {s: len(q) for s, q in questions.items()},
                           "questions_too_long_dropped": {s: 0 for s in questions}},
        "retrieval": retrieval, **scores, "new_information": new_info,
        "generator": {"spec": rc.generator, "zero_shot": True,
                      **{key: value for key, value in chat_decoding(config).items()
                         if key != "batch_size"}},
        "timings": timings, "samples": samples,
    }
    if rc.get("in_context_k", 0):
        with timed(timings, "in_context_s"):
            results["in_context"] = in_context(rag, questions, train_passages, rc, config.seed,
                                               (index.ids, index.vectors))
    return write_results(workdir, results)


def check_in_context_settings(rc) -> tuple:
    from retrieval import in_context_qa

    settings = tuple(rc.get("in_context_settings", in_context_qa.SETTINGS))
    if not settings or not set(settings) <= set(in_context_qa.SETTINGS):
        raise ValueError(f"config.rag.in_context_settings={settings!r}; expected a non-empty "
                         f"subset of {in_context_qa.SETTINGS}")
    return settings


def in_context(rag, questions, train_passages, rc, seed, embedded=None) -> dict:
    """The test questions answered with rc.in_context_k demonstrations from the training
    split, closed-book and with the exact top-k passages (retrieval/in_context_qa.py): the
    zero-shot modes closed_book / rag_exact with only the demonstrations added."""
    from retrieval import in_context_qa

    out = in_context_qa.run(rag.generator, rag.retriever, questions, train_passages,
                            ks=(rc.in_context_k,), passages_per_prompt=rc.k, seed=seed,
                            log=log.info, embedded=embedded,
                            settings=check_in_context_settings(rc))
    return {"k": rc.in_context_k, "demonstrations": out["demonstrations"][rc.in_context_k],
            **{row["setting"]: {key: row[key] for key in
                                ("count", "exact_match", "f1", "gold_contained",
                                 "prompt_tokens", "seconds")}
                                | {"per_question": {m: [a[m] for a in row["answers"]] for m in
                                                    ("exact_match", "f1", "gold_contained")}}
               for row in out["rows"]}}


def build_or_load_index(config, workdir, passages, timings):
    """-> (Retriever over the KB, its index): W/index when saved (refused if another
    encoder or knowledge base made it), else every passage embedded, indexed and saved."""
    rc = config.rag
    encoder = load_encoder(rc.encoder)
    fingerprint = encoder_fingerprint(encoder[0])
    index_dir = os.path.join(workdir, "index")
    index_cfg = IndexConfig.from_config(config.index)  # Checked even when loading.
    if os.path.isfile(os.path.join(index_dir, "index.json")):
        saved = load_index(index_dir, expected_fingerprint=fingerprint)
        if set(saved.index.ids) != set(passages):
            raise ValueError(f"{index_dir} indexes another knowledge base "
                             f"({len(saved.index)} passages, {len(passages)} expected); "
                             f"delete it or use another workdir")
        return (rag_lib.Retriever(encoder, saved.index, dict(passages), rc.encode_batch_size),
                saved.index)
    retriever = rag_lib.Retriever(encoder, None, dict(passages), rc.encode_batch_size)
    ids = list(passages)
    with timed(timings, "embed_passages_s"):
        vectors = retriever.embed([passages[i] for i in ids],
                                  progress=_progress_log("Embedding passages", len(ids)))
    with timed(timings, "index_build_s"):
        index = build_index(vectors, ids, index_cfg)
    save_index(index_dir, index, encoder_fingerprint=fingerprint, passages=passages)
    retriever.index = index
    return retriever, index


def generator_data(config, workdir, retriever, exact, passages, questions, train_passages,
                   timings):
    """The generator's tokenizer and W/qa/{train,validation,test}.jsonl: RAFT training
    examples, held-out questions with their exact top-k passages.

    -> (the generator's train config, questions {split: [Question]} that fit the prompt,
    how many did not {split: n}, question vectors {split: [n, dim]}).
    """
    rc, k = config.rag, config.rag.k
    gen = generator_config(config, workdir)
    gen.data.tokenizer_path = _tokenizer_path(config, workdir, train_passages,
                                              questions["train"])
    questions, too_long = _questions_that_fit(gen.data, questions)
    with timed(timings, "embed_questions_s"):
        question_vectors = {s: retriever.embed([q.question for q in qs])
                            for s, qs in questions.items()
                            if qs and (s != "train" or rc.train_distractors == "retrieved")}
    train_ids = _train_candidates(config, questions["train"], question_vectors, exact,
                                  train_passages)
    prefix_lm.write_split(gen.data.qa_dir, "train", raft_examples(
        questions["train"], train_ids, train_passages, k, rc.distractor_fraction,
        rc.no_context_fraction, config.seed))
    for split in ("validation", "test"):
        _, ids = exact.search(question_vectors[split], k)
        prefix_lm.write_split(gen.data.qa_dir, split,
                              eval_examples(questions[split], ids, passages, k))
    return gen, questions, too_long, question_vectors


def _questions_that_fit(data_cfg, questions):
    """Questions are never truncated: those that cannot fit the prompt are not asked.
    -> ({split: [Question] that fit}, {split: how many did not})."""
    tok = tokenizers.get_tokenizer(data_cfg)
    fitting, too_long = {}, {}
    for split, qs in questions.items():
        lengths, budget = prefix_lm.question_lengths(tok, data_cfg, [q.question for q in qs])
        fitting[split] = [q for q, n in zip(qs, lengths) if n <= budget]
        too_long[split] = len(qs) - len(fitting[split])
    return fitting, too_long


def _train_candidates(config, train_q, question_vectors, exact, train_passages):
    """Per training question, k + 1 passage ids best first (raft_examples' `retrieved_ids`):
    retrieved from the training-split passages, or RAFT's random ones."""
    k = config.rag.k
    if config.rag.train_distractors == "retrieved":  # From training-split passages only.
        rows = [i for i, pid in enumerate(exact.ids) if pid in train_passages]
        train_index = ExactIndex(exact.vectors[rows], [exact.ids[i] for i in rows])
        return train_index.search(question_vectors["train"], k + 1)[1]
    # RAFT's sampled distractors: k + 1 random training passages per question.
    pool = np.asarray(sorted(train_passages))
    rng = np.random.default_rng(config.seed)
    train_ids = [[q.passage_id, *pool[rng.choice(len(pool), k + 1, replace=False)]]
                 for q in train_q]
    # The gold passage first stands for "retrieved at rank 1"; move it to a random rank
    # half the time so position alone never gives the answer away.
    for row in train_ids:
        if rng.random() < 0.5:
            row.insert(int(rng.integers(1, k + 1)), row.pop(0))
    return train_ids


def train_generator(gen, workdir, timings) -> dict:
    """W/generator: the normal loop (trains, resumes, or finds it finished) -> its results,
    or {"preempted_at_step": step} when SIGTERM stopped it."""
    from train import loop

    with timed(timings, "generator_s"):
        return loop.train_and_evaluate(gen, os.path.join(workdir, "generator"))


def new_information(rag, retriever, index, passages, test_q, rc) -> dict:
    """New knowledge without retraining: the passages of some test questions are deleted
    from the index, those questions answered (before), the passages embedded and upserted,
    the questions answered again (after). Leaves the index whole."""
    held_out = set(wordnet_qa.subsample({q.passage_id for q in test_q},
                                        rc.new_info_passages, "new-information"))
    new_q = [q for q in test_q if q.passage_id in held_out]
    new_info = {"passages": len(held_out), "questions": len(new_q)}
    if new_q:
        index.delete(sorted(held_out))
        new_info["before"] = _evaluate_rag(rag, new_q, rc.k)
        with timed(new_info, "upsert_s"):
            retriever.add_passages({i: passages[i] for i in sorted(held_out)})
        new_info["after"] = _evaluate_rag(rag, new_q, rc.k)
    return new_info


def evaluate_retrieval(index, exact, queries, test_q, k, timings):
    """Exact and index search of the test questions' vectors [n, dim] -> (recall@{1, k,
    deep} of each and their overlap, {"exact" | "index": (scores [n, k], ids [n, deep])})."""
    gold_ids = [q.passage_id for q in test_q]
    deep = min(max(k, 10), len(index))
    _, exact_ids = exact.search(queries, deep)
    with timed(timings, "index_search_s"):
        index_scores, index_ids = index.search(queries, deep)
    exact_scores = exact.search(queries, k)[0]
    retrieval = {"index_kind": index.kind, "k": k}
    for name, ids in (("exact", exact_ids), ("index", index_ids)):
        for at in sorted({1, k, deep}):
            retrieval[f"{name}/recall@{at}"] = rag_lib.recall_at_k(ids[:, :at], gold_ids)
    retrieval[f"index_vs_exact/recall@{deep}"] = float(np.mean(
        [len(set(a) & set(b)) / deep for a, b in zip(index_ids, exact_ids)]))
    return retrieval, {"exact": (exact_scores, exact_ids), "index": (index_scores[:, :k],
                                                                     index_ids)}


def evaluate_answers(rag, test_q, hits, rc, timings):
    """EM / F1 (overall and by question kind), speed and sample answers of each mode:
    closed-book, RAG over exact / index search, oracle (the gold passage alone), and with
    rc.reretrieve_every re-retrieving during decoding -> (scores, samples) by mode."""
    k, every = rc.k, rc.reretrieve_every
    texts, gold = [q.question for q in test_q], [q.answers for q in test_q]
    gold_ids = [q.passage_id for q in test_q]
    exact_scores, exact_ids = hits["exact"]
    modes = {"closed_book": functools.partial(rag.answer_with, texts, [[] for _ in test_q]),
             # End to end: embedding, index search and decoding, timed together.
             "rag_index": functools.partial(rag.answer, texts, k, reretrieve_every=0),
             # Where exact search packs the passages the index did, the prompt is the
             # same: its answer is read, not decoded again (greedy decoding).
             "rag_exact": functools.partial(rag.answer_with, texts, exact_ids[:, :k],
                                            exact_scores, reuse=True),
             "oracle": functools.partial(rag.answer_with, texts, [[i] for i in gold_ids])}
    if every:  # Searches the index (as rag_index), again every `every` answer pieces.
        modes["rag_reretrieve"] = functools.partial(rag.answer, texts, k,
                                                    reretrieve_every=every)
    scores, samples, seconds = {}, {}, {}
    for mode, answer_all in modes.items():
        with timed(seconds, mode):
            answers = answer_all()
            scores[mode] = rag_lib.score_answers(answers, gold, per_question=True)
            if mode == "rag_reretrieve":
                scores[mode].update(_reretrieval_stats(answers, gold_ids),
                                    reretrieve_every=every)
        reused = sum(a.reused for a in answers)
        # Speed of the questions decoded here; none when every answer was read.
        scores[mode]["answers_reused"] = reused
        scores[mode]["questions_per_s"] = ((len(test_q) - reused) / seconds[mode]
                                           if reused < len(test_q) else None)
        scores[mode]["by_kind"] = {
            kind: rag_lib.score_answers([a for a, q in zip(answers, test_q) if q.kind == kind],
                                        [q.answers for q in test_q if q.kind == kind])
            for kind in sorted({q.kind for q in test_q})}
        samples[mode] = [{"question": a.question, "answer": a.answer, "gold": list(g),
                          "citations": a.citations}
                         | ({"rounds": [dataclasses.asdict(r) for r in a.rounds]}
                            if mode == "rag_reretrieve" else {})
                         for a, g in zip(answers[:5], gold)]
    timings["end_to_end_questions_per_s"] = scores["rag_index"]["questions_per_s"]
    return scores, samples


def _reretrieval_stats(answers, gold_ids) -> dict:
    """Rounds per answer, how often a later round changed the passages, and whether the
    gold passage was cited in any round / in the first round."""
    changed = [len({tuple(c for c, _ in r.citations) for r in a.rounds}) > 1 for a in answers]
    return {
        "mean_rounds": float(np.mean([len(a.rounds) for a in answers])) if answers else 0.0,
        "passages_changed": float(np.mean(changed)) if answers else 0.0,
        "gold_passage_cited_first_round": rag_lib.recall_at_k(
            [[c for c, _ in a.rounds[0].citations] for a in answers], gold_ids),
        "gold_passage_cited_any_round": rag_lib.recall_at_k(
            [[c for r in a.rounds for c, _ in r.citations] for a in answers], gold_ids),
    }


def _evaluate_rag(rag, questions, k) -> dict:
    answers = rag.answer([q.question for q in questions], k)
    out = rag_lib.score_answers(answers, [q.answers for q in questions], per_question=True)
    out["gold_passage_cited"] = rag_lib.recall_at_k([[c for c, _ in a.citations] for a in answers],
                                          [q.passage_id for q in questions])
    return out
