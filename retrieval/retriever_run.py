"""The retriever stage end to end (`config.task = "retriever"`, configs/retriever.py),
called by launch.main.

    W/config.json, W/checkpoints/, W/metrics.jsonl ...   the normal loop's run (task
                         "retriever"): a strata workdir, so `load_encoder(W)` and
                         `--config.rag.encoder=W` use the trained encoder
    W/qa/*.jsonl         the (question, passage, passage_id) pairs per split
    W/results.json       the loop's results (in-batch accuracy, parameters, train time)
                         plus recall_before / recall_after and the knowledge base's sizes

1. Knowledge base and questions (rag_run.knowledge_base over config.retriever): training
   pairs are training-split questions with their passage; validation / test questions
   are about KB synsets (synsets the training questions never saw).
2. recall_before: every KB passage and the test questions embedded (mean-pooled,
   L2-normalised) by the encoder the run starts from (the seed's init with init_from
   loaded over it, PEFT parameters at their init), exact search, recall@k.
3. The loop trains (or resumes, or finds the run finished).
4. recall_after: the same with the trained encoder, loaded from W as RAG would.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from retrieval import rag as rag_lib
from retrieval.exact import ExactIndex
from retrieval.rag_run import knowledge_base
from train.data import tokenizer as tokenizers
from train.embedding import embed_texts, load_encoder
from train.run_files import write_results
from train.tasks import pairs

log = logging.getLogger("strata")


def pair_examples(questions, passages) -> list[dict]:
    return [{"qid": q.qid, "question": q.question, "passage": passages[q.passage_id],
             "passage_id": q.passage_id} for q in questions]


def initial_encoder(config):
    """The encoder the loop starts from -> (params {"encoder": ...}, model, tokenizer,
    max_len), as `load_encoder` returns: the seed's init (as model_setup's) with
    config.init_from's parameters loaded over it."""
    from train import model_setup
    from train.init_from import init_params_from

    model = model_setup.build_model(config)
    tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
    params = jax.jit(lambda key: nn.unbox(model.init(
        {"params": key}, tokens, deterministic=True, heads=model.cfg.heads,
        **model_setup.init_inputs(model, tokens))["params"]))(jax.random.key(config.seed))
    if config.init_from:
        params, _ = init_params_from(config.init_from, params)
    return ({"encoder": params["encoder"]}, model, tokenizers.get_tokenizer(config.data),
            config.data.seq_len)


def recall(encoder, passages, questions, ks, batch_size) -> dict:
    """recall@k of `questions` over every passage of `passages` {id: text}: exact search
    over the encoder's unit vectors; also by question kind."""
    params, model, tok, max_len = encoder
    ids = list(passages)
    start = time.perf_counter()
    vectors = embed_texts(params, model, tok, [passages[i] for i in ids], batch_size, max_len)
    queries = embed_texts(params, model, tok, [q.question for q in questions], batch_size,
                          max_len)
    _, top = ExactIndex(vectors, ids).search(queries, min(max(ks), len(ids)))
    gold = [q.passage_id for q in questions]
    out = {f"recall@{k}": rag_lib.recall_at_k(top[:, :k], gold) for k in ks}
    out["by_kind"] = {
        kind: {f"recall@{k}": rag_lib.recall_at_k(
            [row[:k] for row, q in zip(top, questions) if q.kind == kind],
            [q.passage_id for q in questions if q.kind == kind]) for k in ks}
        for kind in sorted({q.kind for q in questions})}
    out["embed_and_search_s"] = time.perf_counter() - start
    return out


def run(config, workdir):
    """Writes the pairs, measures recall before, trains, measures recall after; writes
    and returns W/results.json."""
    from train import loop

    rc = config.retriever
    os.makedirs(workdir, exist_ok=True)
    passages, questions, train_passages = knowledge_base(config, rc)
    log.info("Knowledge base: %d passages; questions %s", len(passages),
             {s: len(q) for s, q in questions.items()})
    if not questions["train"] or not questions["test"]:
        raise ValueError(f"No training or test questions for config.retriever={rc}; "
                         f"raise kb_size / max_*_questions")
    train_config = ml_collections.ConfigDict(config.to_dict())
    train_config.data.qa_dir = os.path.join(workdir, "qa")
    pairs.write_split(train_config.data.qa_dir, "train",
                      pair_examples(questions["train"], train_passages))
    for split in ("validation", "test"):
        pairs.write_split(train_config.data.qa_dir, split,
                          pair_examples(questions[split], passages))

    ks, test_q = tuple(rc.recall_at), questions["test"]
    before = recall(initial_encoder(train_config), passages, test_q, ks, rc.encode_batch_size)
    log.info("Recall before training: %s", {k: v for k, v in before.items()
                                            if k.startswith("recall@")})
    # results.json only once recall_after is in it: it marks the run finished.
    results = loop.train_and_evaluate(train_config, workdir, results_file=False)
    if "preempted_at_step" in results:
        return results
    after = recall(load_encoder(workdir), passages, test_q, ks, rc.encode_batch_size)
    log.info("Recall after training: %s", {k: v for k, v in after.items()
                                           if k.startswith("recall@")})
    results.update(
        recall_before=before, recall_after=after,
        knowledge_base={"passages": len(passages),
                        "questions": {s: len(q) for s, q in questions.items()},
                        "train_pairs_distinct_passages": len(
                            {q.passage_id for q in questions["train"]})},
        recall_gain={f"recall@{k}": after[f"recall@{k}"] - before[f"recall@{k}"]
                     for k in ks})
    return write_results(workdir, results)
