"""Tasks by name (`config.task`): each module registers one `Task` (train/tasks/registry.py).

  classify    supervised sequence classification
  mlm         masked-LM pre-training (UniLM's prefix-LM mix optional)
  prefix_lm   answers after a bidirectional prompt (the RAG generator)
  retriever   contrastive (question, passage) training; runner: retrieval/retriever_run.py
  rag         index + generator + evaluation; runner: retrieval/rag_run.py
"""

from train.tasks import classify, mlm, prefix_lm, rag, retriever  # noqa: F401 - register.
from train.tasks.registry import Task, abstract_batch, get_task, loop_task, registered

__all__ = ["Task", "abstract_batch", "get_task", "loop_task", "registered"]
