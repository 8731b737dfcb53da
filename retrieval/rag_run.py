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
                         timings

1. Knowledge base and questions (retrieval/wordnet_qa.py), split by synset.
2. Index: every passage embedded with the retriever encoder (all-MiniLM-L6-v2); built or
   loaded (a saved index from another encoder is refused).
3. Generator examples, RAFT style: each training question with k passages: its own and
   distractors, either retrieved (`train_distractors="retrieved"`: top-k from an index of
   the KB's *training-split* passages; the answer passage at its retrieved rank, or a
   random one where retrieval missed it) or sampled (`"random"`, as RAFT: random
   training passages, so questions can come from every training synset without
   embedding them). A `distractor_fraction` of examples has the answer passage removed
   (k distractors), a `no_context_fraction` has no passages at all.
4. The generator trains through train.loop (or resumes / loads when already trained).
5. Evaluation on held-out (test-split) questions; then "new information": the passages of
   some test questions are deleted from the index, the questions answered (before),
   the passages embedded and upserted with no training, the questions answered (after).
"""

from __future__ import annotations

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
from train.data import prefix_lm
from train.data import tokenizer as tokenizers
from train.embedding import load_encoder, unflatten

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
    return rag_lib.Rag(retriever, load_generator(os.path.join(workdir, "generator")),
                       reretrieve_every=config.rag.get("reretrieve_every", 0)), config


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


# --- The run ------------------------------------------------------------------------------

def run(config, workdir):
    """Builds / loads everything, evaluates, writes W/results.json; returns the results."""
    from train import loop

    rc, timings = config.rag, {}
    if rc.get("reretrieve_every", 0) < 0:  # Before the hours of training, not after.
        raise ValueError(f"config.rag.reretrieve_every={rc.reretrieve_every}; expected >= 0 "
                         f"(0 = off)")
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    passages, questions, train_passages = knowledge_base(config)
    timings["knowledge_base_s"] = time.perf_counter() - start
    log.info("Knowledge base: %d passages; questions %s", len(passages),
             {s: len(q) for s, q in questions.items()})

    # --- Retriever and index ---------------------------------------------------------
    encoder = load_encoder(rc.encoder)
    fingerprint = encoder_fingerprint(encoder[0])
    index_dir = os.path.join(workdir, "index")
    index_cfg = IndexConfig.from_config(config.index)
    if os.path.isfile(os.path.join(index_dir, "index.json")):
        saved = load_index(index_dir, expected_fingerprint=fingerprint)
        if set(saved.index.ids) != set(passages):
            raise ValueError(f"{index_dir} indexes another knowledge base "
                             f"({len(saved.index)} passages, {len(passages)} expected); "
                             f"delete it or use another workdir")
        index = saved.index
        retriever = rag_lib.Retriever(encoder, index, dict(passages), rc.encode_batch_size)
    else:
        retriever = rag_lib.Retriever(encoder, None, dict(passages), rc.encode_batch_size)
        ids = list(passages)
        t = time.perf_counter()
        vectors = retriever.embed([passages[i] for i in ids],
                                  progress=_progress_log("Embedding passages", len(ids)))
        timings["embed_passages_s"] = time.perf_counter() - t
        t = time.perf_counter()
        index = build_index(vectors, ids, index_cfg)
        timings["index_build_s"] = time.perf_counter() - t
        save_index(index_dir, index, encoder_fingerprint=fingerprint, passages=passages)
        retriever.index = index
    exact = ExactIndex(index.vectors, index.ids)

    # --- Generator examples, then the generator ----------------------------------------
    gen = generator_config(config, workdir)
    gen.data.tokenizer_path = _tokenizer_path(config, workdir, train_passages,
                                              questions["train"])
    # Questions are never truncated: those that cannot fit the prompt are not asked.
    tok = tokenizers.get_tokenizer(gen.data)
    budget = prefix_lm.prompt_budget(gen.data.seq_len, gen.data.max_answer_tokens)
    too_long = {}
    for split, qs in questions.items():
        lengths = [len(ids) + 2 for ids in tok.encode_batch([q.question for q in qs])]
        questions[split] = [q for q, n in zip(qs, lengths) if n <= budget]
        too_long[split] = len(qs) - len(questions[split])
    k = rc.k
    train_q = questions["train"]
    t = time.perf_counter()
    question_vectors = {s: retriever.embed([q.question for q in qs])
                        for s, qs in questions.items()
                        if qs and (s != "train" or rc.train_distractors == "retrieved")}
    timings["embed_questions_s"] = time.perf_counter() - t
    if rc.train_distractors == "retrieved":  # From training-split passages only.
        rows = [i for i, pid in enumerate(exact.ids) if pid in train_passages]
        train_index = ExactIndex(exact.vectors[rows], [exact.ids[i] for i in rows])
        _, train_ids = train_index.search(question_vectors["train"], k + 1)
    else:  # RAFT's sampled distractors: k + 1 random training passages per question.
        pool = np.asarray(sorted(train_passages))
        rng = np.random.default_rng(config.seed)
        train_ids = [[q.passage_id, *pool[rng.choice(len(pool), k + 1, replace=False)]]
                     for q in train_q]
        # The gold passage first stands for "retrieved at rank 1"; move it to a random
        # rank half the time so position alone never gives the answer away.
        for row in train_ids:
            if rng.random() < 0.5:
                row.insert(int(rng.integers(1, k + 1)), row.pop(0))
    prefix_lm.write_split(gen.data.qa_dir, "train", raft_examples(
        train_q, train_ids, train_passages, k, rc.distractor_fraction,
        rc.no_context_fraction, config.seed))
    for split in ("validation", "test"):
        _, ids = exact.search(question_vectors[split], k)
        prefix_lm.write_split(gen.data.qa_dir, split,
                              eval_examples(questions[split], ids, passages, k))
    t = time.perf_counter()
    gen_workdir = os.path.join(workdir, "generator")
    gen_results = loop.train_and_evaluate(gen, gen_workdir)
    timings["generator_s"] = time.perf_counter() - t
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(gen.to_dict() | {"task": "rag"}, f, indent=2, default=list)
    rag = rag_lib.Rag(retriever, load_generator(gen_workdir))

    # --- New information without retraining (before the main evaluation: it needs the
    # index without the held-out passages, and leaves it whole again) --------------------
    test_q = questions["test"]
    held_out = set(wordnet_qa.subsample({q.passage_id for q in test_q},
                                        rc.new_info_passages, "new-information"))
    new_q = [q for q in test_q if q.passage_id in held_out]
    new_info = {"passages": len(held_out), "questions": len(new_q)}
    if new_q:
        index.delete(sorted(held_out))
        new_info["before"] = _evaluate_rag(rag, new_q, k)
        t = time.perf_counter()
        retriever.add_passages({i: passages[i] for i in sorted(held_out)})
        new_info["upsert_s"] = time.perf_counter() - t
        new_info["after"] = _evaluate_rag(rag, new_q, k)

    # --- Evaluation on held-out questions --------------------------------------------
    gold = [q.answers for q in test_q]
    gold_ids = [q.passage_id for q in test_q]
    queries = question_vectors["test"]
    deep = min(max(k, 10), len(index))
    _, exact_ids = exact.search(queries, deep)
    t = time.perf_counter()
    scann_scores, scann_ids = index.search(queries, deep)
    timings["index_search_s"] = time.perf_counter() - t
    exact_scores = exact.search(queries, k)[0]
    retrieval = {"index_kind": index.kind, "k": k}
    for name, ids in (("exact", exact_ids), ("index", scann_ids)):
        for at in sorted({1, k, deep}):
            retrieval[f"{name}/recall@{at}"] = rag_lib.recall_at_k(ids[:, :at], gold_ids)
    retrieval[f"index_vs_exact/recall@{deep}"] = float(np.mean(
        [len(set(a) & set(b)) / deep for a, b in zip(scann_ids, exact_ids)]))

    texts = [q.question for q in test_q]
    modes = {"closed_book": functools.partial(rag.answer_with, texts, [[] for _ in test_q]),
             "rag_exact": functools.partial(rag.answer_with, texts, exact_ids[:, :k],
                                            exact_scores),
             "rag_index": functools.partial(rag.answer_with, texts, scann_ids[:, :k],
                                            scann_scores[:, :k]),
             "oracle": functools.partial(rag.answer_with, texts, [[i] for i in gold_ids])}
    every = rc.get("reretrieve_every", 0)
    if every:  # Searches the index (as rag_index), again every `every` answer pieces.
        modes["rag_reretrieve"] = functools.partial(rag.answer, texts, k,
                                                    reretrieve_every=every)
    scores, samples = {}, {}
    for mode, answer_all in modes.items():
        t = time.perf_counter()
        answers = answer_all()
        scores[mode] = rag_lib.score_answers(answers, gold)
        if mode == "rag_reretrieve":
            scores[mode].update(_reretrieval_stats(answers, gold_ids), reretrieve_every=every)
        scores[mode]["questions_per_s"] = len(test_q) / (time.perf_counter() - t)
        scores[mode]["by_kind"] = {
            kind: rag_lib.score_answers([a for a, q in zip(answers, test_q) if q.kind == kind],
                                        [q.answers for q in test_q if q.kind == kind])
            for kind in sorted({q.kind for q in test_q})}
        samples[mode] = [{"question": a.question, "answer": a.answer, "gold": list(g),
                          "citations": a.citations}
                         | ({"rounds": [dataclasses.asdict(r) for r in a.rounds]}
                            if mode == "rag_reretrieve" else {})
                         for a, g in zip(answers[:5], gold)]
    t = time.perf_counter()
    rag.answer(texts, k)
    timings["end_to_end_questions_per_s"] = len(test_q) / (time.perf_counter() - t)

    results = {
        "knowledge_base": {"passages": len(passages),
                           "questions": {s: len(q) for s, q in questions.items()},
                           "questions_too_long_dropped": too_long},
        "retrieval": retrieval, **scores, "new_information": new_info,
        "generator": {key: gen_results.get(key) for key in
                      ("step", "train_time_s", "validation", "test", "parameters")},
        "timings": timings, "samples": samples,
    }
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return results


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
    out = rag_lib.score_answers(answers, [q.answers for q in questions])
    out["gold_passage_cited"] = rag_lib.recall_at_k([[c for c, _ in a.citations] for a in answers],
                                          [q.passage_id for q in questions])
    return out
