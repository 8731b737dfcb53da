"""Ask a trained RAG run a question: prints the answer and the passages it cited.

  python -m launch.ask --workdir runs/rag "What is a poodle a kind of?"
  python -m launch.ask --workdir runs/rag --k 5 --closed_book "Which word means ..."
  python -m launch.ask --workdir runs/rag --reretrieve_every 3 "What is a poodle a kind of?"

Loads the run's retriever encoder, its saved index (refused if another encoder made it)
and its generator (retrieval/rag_run.py `load_rag`).
"""

import logging

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished configs/rag.py run directory.")
_K = flags.DEFINE_integer("k", 0, "Passages to retrieve; 0: the run's config.rag.k.")
_CLOSED_BOOK = flags.DEFINE_bool("closed_book", False, "Answer without retrieval.")
_RERETRIEVE_EVERY = flags.DEFINE_integer(
    "reretrieve_every", -1, "Re-retrieve every N answer pieces (0: off); -1: the run's "
    "config.rag.reretrieve_every.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    questions = [q for q in argv[1:] if q.strip()]
    if not questions:
        raise app.UsageError('Give at least one question: launch.ask --workdir W "..."')
    logging.getLogger("strata").setLevel(logging.WARNING)
    from retrieval.rag_run import load_rag

    rag, config = load_rag(_WORKDIR.value)
    if _CLOSED_BOOK.value:
        answers = rag.answer_with(questions, [[] for _ in questions])
    else:
        every = None if _RERETRIEVE_EVERY.value < 0 else _RERETRIEVE_EVERY.value
        answers = rag.answer(questions, _K.value or config.rag.k, reretrieve_every=every)
    for answer in answers:
        print(f"Q: {answer.question}\nA: {answer.answer}")
        if len(answer.rounds) > 1:  # Re-retrieval: each round's query and passages.
            for r in answer.rounds:
                print(f"  round after {r.after_tokens} pieces, query {r.query!r}:")
                _print_citations(rag, r.citations, indent="    ")
        else:
            _print_citations(rag, answer.citations)


def _print_citations(rag, citations, indent="  "):
    for doc_id, score in citations:
        text = rag.retriever.passages[doc_id]
        shown = "oracle" if score is None else f"score {score:.3f}"
        print(f"{indent}[{doc_id}] {shown}  {text[:160]}")


if __name__ == "__main__":
    app.run(main)
