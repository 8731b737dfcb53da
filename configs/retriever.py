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

import ml_collections

from configs import common, finetune


def get_config(arg=None):
    arg = common.parse_arg(arg, method="full", size="mini", runlocal=False, freeze_blocks=2,
                           freeze_embeddings=True, norm_offsets=False, lora_rank=8,
                           lora_alpha=16.0, lora_targets="query|value", prompt_length=20,
                           prefix_length=20, prefix_mlp_dim=0, adapter_dim=64,
                           adapter_norms=True, layer_decay=0.75, hf="minilm")
    if arg.method == "linear_probe":
        raise ValueError("configs/retriever.py: method=linear_probe trains only a head and "
                         "the retriever has none; use bitfit, lora, adapters, freeze, ...")
    c = common.base_config()
    c.task = "retriever"
    # No head: the loss reads the encoder's mean-pooled hidden states.
    c.model = common.model_config("tiny" if arg.runlocal else arg.size, heads=(),
                                  pooling="mean")
    if arg.hf and not arg.runlocal:
        c.init_from = f"hf:{arg.hf}"
        c.model.update(common.PRETRAINED.get(arg.hf, {}))
    c.data.tokenizer, c.data.tokenizer_path = "wordpiece", f"hf:{arg.hf or 'minilm'}"
    c.model.vocab_size = c.data.vocab_size = 30522  # BERT's uncased WordPiece vocabulary.
    c.model.update(finetune.method_model_fields(arg))
    # The fine-tuning methods' rules less the classification head's.
    c.optim.param_rules = tuple(r for r in finetune.method_rules(arg, c.model.num_layers)
                                if r[0] != finetune.HEAD)
    if arg.method == "layerwise_lr_decay":
        c.optim.layerwise_lr_decay = arg.layer_decay
    # Full fine-tuning of a pre-trained encoder takes small steps; few parameters larger.
    c.optim.lr = 3e-5 if arg.method in ("full", "freeze", "layerwise_lr_decay") else 1e-3
    c.optim.warmup_steps = 50
    c.data.seq_len = 128  # Passages are up to ~100 pieces; questions shorter.
    c.data.batch_size = 64  # Pairs: each query has 63 in-batch negatives.
    c.data.eval_batch_size = 64
    c.train.num_steps = 500
    c.train.log_every = 25
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.train.eval_steps = 8
    c.retriever = ml_collections.ConfigDict(dict(
        temperature=0.05,  # logits = cos(q, p) / temperature.
        symmetric_loss=False,  # Also passage -> question cross-entropy, averaged.
        kb_size=0,  # Passages in the knowledge base; 0: every synset (117,659).
        question_kinds=("hypernym", "gloss"),
        max_train_questions=0,  # 0: every training-split question.
        max_eval_questions=2000,  # Per held-out split.
        # rag_run.knowledge_base: "random" takes training questions from every
        # training-split synset (not only the KB's); no distractors are used here.
        train_distractors="random",
        recall_at=(1, 5, 20),
        encode_batch_size=64,
    ))
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
