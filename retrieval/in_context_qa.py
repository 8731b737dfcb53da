"""k-shot question answering with a chat decoder, no weight update: held-out WordNet
questions (retrieval/wordnet_qa.py) answered greedily by SmolLM2 (retrieval/chat_generator.py)
with k demonstrations from the training split before each question, closed-book and
with retrieval.

    demos = select_demonstrations(questions["train"], k=3, seed=0)
    exchanges = demonstration_exchanges(demos, "retrieval", train_passages, distractors)
    ChatGenerator(..., demonstrations=exchanges).generate(questions, passages)

Demonstrations: the same for every query at a given k, drawn with a fixed seed from the
training split only (a test question never shows up), nested (k = 1's is the first of
k = 3's, ...) so rows differ by the added demonstrations alone, and alternating between
the question kinds (hypernym, gloss, hypernym, ...) so both formats are shown from k = 2.
Each is a (question, passages, answer) exchange in the format its query gets:
- "closed_book": no passages, for the demonstration as for the query.
- "retrieval": the query gets the knowledge base's exact top-`passages` (all-MiniLM,
  retrieval/exact.py); a demonstration gets its own gold passage and `passages` - 1
  distractors: the training-split KB passages nearest its question (the same encoder),
  the gold at a seeded random rank, so position never gives the answer away.
The answer shown is the question's first gold answer (a lemma, a few words): what the
demonstrations teach is the short answer format that exact match rewards.

Scores per (setting, k): exact match, token F1 and gold contained (retrieval/rag.py) with
95% intervals (Wilson for the two proportions; percentile bootstrap over questions for
F1), and the paired difference from k = 0 in the same setting (bootstrap interval; exact
McNemar p-value for the 0/1 metrics). Every answer is kept, by question id, for paired
comparisons with other runs on the same questions (the RAFT-fine-tuned generator).
"""

from __future__ import annotations

import time

import numpy as np

from retrieval import rag as rag_lib
from retrieval.exact import ExactIndex
from retrieval.wordnet_qa import QUESTION_KINDS
from train.data.wordnet import split_of
from train.experiments import statistics as stats

SETTINGS = ("closed_book", "retrieval")


def select_demonstrations(train_questions, k: int, seed: int = 0) -> list:
    """k of `train_questions` (all of the training split): each kind's questions in a
    `seed`ed order, taken in turns of the kinds (the first kind chosen by the seed too).
    Nested: the first k of a larger k's selection."""
    if k < 0:
        raise ValueError(f"k={k}; expected >= 0")
    wrong = [q.qid for q in train_questions if q.split != "train"]
    if wrong:
        raise ValueError(f"Demonstrations come from the training split; {len(wrong)} "
                         f"questions are not, e.g. {wrong[:3]}")
    rng = np.random.default_rng(seed)
    pools = {kind: sorted((q for q in train_questions if q.kind == kind),
                          key=lambda q: q.qid) for kind in QUESTION_KINDS}
    queues = [[pool[i] for i in rng.permutation(len(pool))] for pool in pools.values()
              if pool]
    first = int(rng.integers(len(queues))) if queues else 0
    queues = queues[first:] + queues[:first]
    chosen = []
    while len(chosen) < k and any(queues):
        for queue in queues:
            if queue and len(chosen) < k:
                chosen.append(queue.pop(0))
    if len(chosen) < k:
        raise ValueError(f"k={k} demonstrations asked for; the training split has "
                         f"{len(train_questions)} questions")
    return chosen


def demonstration_exchanges(demos, setting: str, passages=None, distractors=None,
                            seed: int = 0) -> list[tuple[str, list[str], str]]:
    """Demonstration questions -> (question, passages, answer) exchanges for
    ChatGenerator(demonstrations=...).

    setting "closed_book": no passages. "retrieval": `passages` {id: text} holding each
    demonstration's gold passage, `distractors` [k][m] texts (the nearest other passages,
    best first); the gold goes at a rank drawn with `seed`."""
    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r}; expected one of {SETTINGS}")
    if setting == "closed_book":
        return [(q.question, [], q.answers[0]) for q in demos]
    rng = np.random.default_rng(seed)
    exchanges = []
    for q, others in zip(demos, distractors, strict=True):
        shown = list(others)
        shown.insert(int(rng.integers(0, len(shown) + 1)), passages[q.passage_id])
        exchanges.append((q.question, shown, q.answers[0]))
    return exchanges


def nearest_distractors(retriever, index, demos, count: int) -> list[list[str]]:
    """Per demonstration, the texts of the `count` passages of `index` (an ExactIndex of
    the KB's training-split passages) nearest its question, its own excluded."""
    if not demos or not count:
        return [[] for _ in demos]
    _, ids = index.search(retriever.embed([q.question for q in demos]), count + 1)
    return [[retriever.passages[str(i)] for i in row if str(i) != q.passage_id][:count]
            for q, row in zip(demos, ids)]


def summarise(scores: dict[str, list[float]], baseline: dict | None = None,
              seed: int = 0) -> dict:
    """Per-question scores -> each metric's mean and 95% interval (Wilson for exact match
    and gold contained, percentile bootstrap for F1); with `baseline` (k = 0's scores on
    the same questions) the paired bootstrap difference from it and its interval, and for
    the two 0/1 metrics the exact McNemar p-value."""
    out = {"count": len(scores["f1"])}
    for metric, values in scores.items():
        n = len(values)
        interval = (stats.bootstrap_interval(values, seed=seed) if metric == "f1"
                    else stats.wilson(int(round(sum(values))), n))
        out[metric] = {"mean": float(np.mean(values)) if n else 0.0, "interval": interval}
        if baseline is not None:
            diff, diff_interval = stats.paired_difference(values, baseline[metric], seed=seed)
            out[metric] |= {"minus_k0": diff, "minus_k0_interval": diff_interval}
            if metric != "f1":
                out[metric]["minus_k0_p"] = stats.mcnemar_exact(values, baseline[metric])
    return out


def run(generator, retriever, questions, train_passages, ks=(0, 1, 3, 8),
        settings=SETTINGS, passages_per_prompt: int = 2, seed: int = 0, log=print,
        embedded=None) -> dict:
    """Every (setting, k): the test questions answered with k demonstrations.

    generator: a ChatGenerator (its model, params, tokenizer, decoding are reused with
    each k's demonstrations); retriever: retrieval/rag.py Retriever over the knowledge
    base (its `passages`); questions {split: [Question]} (test: asked; train: the
    demonstration pool); train_passages {id: text}: the training questions' passages;
    embedded: (ids, vectors) of the knowledge base already embedded by the same retriever
    (a built index), else every passage is embedded here.
    -> {"rows": [...], "demonstrations": {k: [qid]}, "retrieval": {recall@m}, ...}."""
    from retrieval.chat_generator import ChatGenerator

    test, pool = questions["test"], questions["train"]
    gold = [list(q.answers) for q in test]
    kb_ids = sorted(retriever.passages)
    top = {"closed_book": [[] for _ in test]}
    recall = None
    if "retrieval" in settings:
        if embedded is None:
            vectors = retriever.embed([retriever.passages[i] for i in kb_ids])
        else:
            row_of = {str(i): row for row, i in enumerate(embedded[0])}
            vectors = np.asarray(embedded[1])[[row_of[str(i)] for i in kb_ids]]
        _, ids = ExactIndex(vectors, kb_ids).search(
            retriever.embed([q.question for q in test]), passages_per_prompt)
        top["retrieval"] = [[retriever.passages[str(i)] for i in row] for row in ids]
        recall = rag_lib.recall_at_k(ids, [q.passage_id for q in test])
    demos_by_k = {k: select_demonstrations(pool, k, seed) for k in ks}
    largest = demos_by_k[max(ks)]  # Nested: every k's demonstrations are among these.
    distractors = {}
    if "retrieval" in settings:
        train_rows = [row for row, i in enumerate(kb_ids) if split_of(i) == "train"]
        train_index = ExactIndex(vectors[train_rows], [kb_ids[row] for row in train_rows])
        nearest = nearest_distractors(retriever, train_index, largest,
                                      passages_per_prompt - 1)
        distractors = {q.qid: d for q, d in zip(largest, nearest)}
    rows = []
    for setting in settings:
        baseline = None
        for k in ks:
            demos = demos_by_k[k]
            exchanges = demonstration_exchanges(
                demos, setting, train_passages, [distractors.get(q.qid, []) for q in demos],
                seed)
            asker = ChatGenerator(generator.model, generator.params, generator.tokenizer,
                                  max_new_tokens=generator.max_new_tokens,
                                  batch_size=generator.batch_size, spec=generator.spec,
                                  demonstrations=exchanges)
            start = time.perf_counter()
            answers, _ = asker.generate([q.question for q in test], top[setting])
            seconds = time.perf_counter() - start
            scores = rag_lib.per_question_scores(answers, gold)
            row = {"setting": setting, "k": k, "seconds": seconds,
                   "prompt_tokens": float(np.mean([len(asker.prompt_ids(q.question, p))
                                                   for q, p in zip(test, top[setting])])),
                   **summarise(scores, baseline, seed),
                   "by_kind": {kind: {m: float(np.mean([v for v, q in zip(values, test)
                                                        if q.kind == kind]))
                                      for m, values in scores.items()}
                               for kind in sorted({q.kind for q in test})},
                   "answers": [{"qid": q.qid, "answer": a, "gold": g,
                                **{m: values[i] for m, values in scores.items()}}
                               for i, (q, a, g) in enumerate(zip(test, answers, gold))]}
            if k == 0:
                baseline = scores
            rows.append(row)
            log(format_row(row))
    return {"questions": len(test), "kinds": {kind: sum(q.kind == kind for q in test)
                                              for kind in sorted({q.kind for q in test})},
            "passages_per_prompt": passages_per_prompt,
            "retrieval": {f"exact/recall@{passages_per_prompt}": recall},
            "demonstrations": {k: [q.qid for q in d] for k, d in demos_by_k.items()},
            "rows": rows}


def format_row(row) -> str:
    """One table line: setting, k, each metric with its interval, seconds."""
    parts = [f"{row['setting']:<11} k={row['k']}:"]
    for metric in ("exact_match", "f1", "gold_contained"):
        m = row[metric]
        low, high = m["interval"]
        parts.append(f"{metric} {m['mean']:.1%} [{low:.1%}, {high:.1%}]")
    em = row["exact_match"]
    if "minus_k0" in em:
        parts.append(f"(exact match - k=0: {em['minus_k0']:+.1%}, McNemar p "
                     f"{em['minus_k0_p']:.2g})")
    return " ".join(parts) + f" ({row['prompt_tokens']:.0f} prompt tokens, " \
                             f"{row['seconds']:.0f} s)"
