"""Retrieval-augmented generation (task "rag"): `retrieval/rag_run.py` builds the index
and the generator's examples, trains the generator through the loop as task
"prefix_lm", then evaluates closed-book / RAG / oracle answers."""

from train.tasks.registry import Task, register


class Rag(Task):
    name = "rag"
    runner = "retrieval.rag_run:run"
    loop_task = "prefix_lm"

    def check(self, config):  # The generator's own checks run too (loop_task).
        rc = config.rag
        if rc.reretrieve_every < 0:
            raise ValueError(f"config.rag.reretrieve_every={rc.reretrieve_every}; "
                             f"expected >= 0 (0 = off)")
        if rc.k < 1 or 0 < rc.kb_size < rc.k:
            raise ValueError(f"config.rag.k={rc.k}; expected 1 <= k <= the knowledge base's "
                             f"passages (config.rag.kb_size={rc.kb_size}; 0 = every synset)")
        if rc.generator_strategy not in ("greedy", "sample"):
            raise ValueError(f"config.rag.generator_strategy={rc.generator_strategy!r}; "
                             f"expected 'greedy' or 'sample'")
        if rc.generator_temperature < 0 or not 0 < rc.generator_top_p <= 1:
            raise ValueError(f"config.rag.generator_temperature={rc.generator_temperature} / "
                             f"generator_top_p={rc.generator_top_p}; expected temperature "
                             f">= 0 and 0 < top_p <= 1")
        if rc.get("in_context_k", 0) < 0 or (rc.get("in_context_k", 0) and not rc.generator):
            raise ValueError(f"config.rag.in_context_k={rc.get('in_context_k')}; expected 0 "
                             f"(off) or k >= 1 demonstrations for a zero-shot chat generator "
                             f"(config.rag.generator='gguf:...'; has {rc.generator!r})")


register(Rag())
