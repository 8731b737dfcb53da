"""Tasks by name (`config.task`): each module registers one `Task` (train/tasks/registry.py).

  classify    supervised sequence classification
  mlm         masked-LM pre-training (UniLM's prefix-LM mix optional)
  prefix_lm   answers after a bidirectional prompt (the RAG generator)
  retriever   contrastive (question, passage) training; runner: retrieval/retriever_run.py
  rag         index + generator + evaluation; runner: retrieval/rag_run.py
  multitask   several WordNet classification tasks, each row routed to its task's head
  classify_image  images -> classes through the shared transformer's patch input (ViT)
  masked_patches  SimMIM masked-patch pre-training on unlabelled images
  grpo        reward-driven post-training after SFT; runner: train/post_training/run.py
  dpo         preference tuning after SFT; runner: train/post_training/run.py
"""

from train.tasks import (  # noqa: F401 - each module registers its task.
    classify,
    classify_image,
    dpo,
    grpo,
    masked_patches,
    mlm,
    multitask,
    prefix_lm,
    rag,
    retriever,
)
from train.tasks.registry import Task, abstract_batch, get_task, loop_task, registered

__all__ = ["Task", "abstract_batch", "get_task", "loop_task", "registered"]
