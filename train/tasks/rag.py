"""Retrieval-augmented generation (task "rag"): `retrieval/rag_run.py` builds the index
and the generator's examples, trains the generator through the loop as task
"prefix_lm", then evaluates closed-book / RAG / oracle answers."""

from train.tasks.registry import Task, register


class Rag(Task):
    name = "rag"
    runner = "retrieval.rag_run:run"
    loop_task = "prefix_lm"

    def check(self, config):  # The generator's own checks run too (loop_task).
        if config.rag.reretrieve_every < 0:
            raise ValueError(f"config.rag.reretrieve_every={config.rag.reretrieve_every}; "
                             f"expected >= 0 (0 = off)")


register(Rag())
