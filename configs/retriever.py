r"""Stage 4a — retriever training: contrastive fine-tuning of the shared encoder on
(question, passage) pairs from the WordNet knowledge base, in-batch negatives (DPR).

  python -m launch.main --config configs/retriever.py --workdir runs/retriever
  python -m launch.main --config configs/retriever.py:method=lora --workdir runs/ret_lora
  python -m launch.main --config configs/retriever.py:runlocal --workdir runs/ret_local
  # The trained encoder as RAG's retriever (train.embedding.load_encoder reads the workdir):
  python -m launch.main --config configs/rag.py --config.rag.encoder=runs/retriever \
      --workdir runs/rag_dpr

Questions and passages come from retrieval/wordnet_qa.py through rag_run.knowledge_base
(training questions about training-split synsets; held-out ones about KB synsets);
retrieval/retriever_run.py writes the pairs, trains through the normal loop (task
"retriever": train/objectives.py `Contrastive`) and writes results.json with recall@k of
the test-split questions over every KB passage (exact search) before (the encoder the run
starts from) and after training.

Arguments: `method=` any of configs/finetune.py's METHODS but linear_probe (a retriever has
no head to probe) with the same method arguments (`lora_rank=`, `freeze_blocks=`,
`adapter_dim=`, ...; the head rules are dropped); `hf=minilm` (default: start from
all-MiniLM-L6-v2, its WordPiece vocabulary, mean pooling; `hf=` trains a random-init
`size=` model); `runlocal` (a random-init tiny model with MiniLM's vocabulary, a
600-passage KB: a few minutes on a shared 2-core CPU).
The KB is every synset (117,659 passages, as configs/rag.py) unless
`--config.retriever.kb_size=N`; recall embeds it twice (before and after).
"""

from configs import common, finetune


def get_config(arg=None):
    arg = finetune.parse_method_arg(arg, size="mini", runlocal=False, hf="minilm")
    if arg.method == "linear_probe":
        raise ValueError("configs/retriever.py: method=linear_probe trains only a head and "
                         "the retriever has none; use bitfit, lora, adapters, freeze, ...")
    c = common.base_config()
    c.task = "retriever"
    # No head: the loss reads the encoder's mean-pooled hidden states.
    c.model = common.model_config("tiny" if arg.runlocal else arg.size, heads=(),
                                  pooling="mean")
    # runlocal and `hf=`: a random-init model, with MiniLM's vocabulary all the same.
    common.apply_hf(c, arg.hf or "minilm", weights=bool(arg.hf) and not arg.runlocal)
    c.model.vocab_size = c.data.vocab_size = 30522  # BERT's uncased WordPiece vocabulary.
    method = finetune.apply_method(c, arg, head=False)
    # Full fine-tuning of a pre-trained encoder takes small steps; few parameters larger.
    c.optim.lr = 3e-5 if method.whole_model else 1e-3
    c.optim.warmup_steps = 50
    c.data.seq_len = 128  # Passages are up to ~100 pieces; questions shorter.
    c.data.batch_size = 64  # Pairs: each query has 63 in-batch negatives.
    c.data.eval_batch_size = 64
    c.train.num_steps = 500
    c.train.log_every = 25
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.train.eval_steps = 8
    # config.retriever (common.base_config: temperature, knowledge base, recall_at, ...)
    # keeps its defaults.
    if arg.runlocal:
        c.model.max_len = c.data.seq_len = 64
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 10
        c.data.batch_size = 32
        c.train.num_steps = 200
        c.train.eval_every = c.train.checkpoint_every = 100
        c.train.eval_steps = 2
        c.train.final_eval_steps = 4
        c.retriever.update(kb_size=600, max_train_questions=20_000, max_eval_questions=300)
    return c
