r"""Stage 4 — retrieval-augmented generation on WordNet knowledge questions.

  python -m launch.main --config configs/rag.py --workdir runs/rag
  python -m launch.main --config configs/rag.py:runlocal --workdir runs/rag_local
  python -m launch.ask --workdir runs/rag "What is a poodle a kind of?"
  # Starting the generator from the MLM checkpoint (same size and tokenizer):
  python -m launch.main --config configs/rag.py --config.init_from=runs/mlm --workdir W
  # SmolLM2-135M-Instruct answering zero-shot from the retrieved passages (no training):
  python -m launch.main --config configs/rag.py:runlocal,gen=smollm2 --workdir runs/rag_smol

One knowledge-base passage per synset, questions whose answer one passage states
(retrieval/wordnet_qa.py), an all-MiniLM-L6-v2 retriever over a ScaNN index, and the
shared transformer as a prefix-LM generator trained RAFT style through the normal loop
(task "prefix_lm"); retrieval/rag_run.py runs it all and writes results.json.
Arguments: `runlocal` (a 1,000-passage KB, hypernym questions, a tiny model: minutes on
a CPU), `size=`, `hf=minilm` (the generator starts from all-MiniLM-L6-v2 and its WordPiece
vocabulary: UniLM's BERT-initialised prefix-LM), `gen=smollm2` (no generator training:
SmolLM2-135M-Instruct from its GGUF file answers zero-shot from a ChatML prompt holding
the k numbered passages, greedy, at most 24 new tokens; retrieval/chat_generator.py).

`--config.rag.reretrieve_every=N` (0: off) re-retrieves during decoding: every N answer
pieces the unfinished answers search again with question + " " + the answer so far and
decode on over the newly packed passages (retrieval/rag.py `Rag`); results.json then adds
a "rag_reretrieve" mode, and launch.ask uses it.
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, size="mini", hf="", gen="")
    c = common.base_config()
    c.task = "rag"
    c.model = common.model_config(arg.size, heads=("lm",), attention_mask="prefix",
                                  max_len=192)
    c.model.vocab_size = c.data.get_ref("vocab_size")
    c.data.seq_len = 192  # The question, k passages and max_answer_tokens + 1.
    c.data.max_answer_tokens = 12
    c.data.batch_size = 64
    c.data.eval_batch_size = 64
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.train.num_steps = 4000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.eval_steps = 8
    c.train.final_eval_steps = 16
    c.train.best_metric = "eval/loss"
    c.train.best_mode = "min"
    # config.rag (common.base_config: encoder, k, knowledge base, RAFT fractions, ...) keeps
    # its defaults: the full-size run.
    if arg.runlocal:
        common.apply_runlocal(c)  # The tiny model.
        c.model.max_len = c.data.seq_len = 96
        c.data.max_answer_tokens = 8
        c.data.vocab_size = 2000
        c.data.batch_size = 32
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 30
        c.train.num_steps = 1500
        c.train.eval_every = 500
        c.train.checkpoint_every = 500
        c.train.final_eval_steps = 4
        # Hypernym questions only: a tiny model learns to copy their (frequent) answers
        # from the passage within minutes; gloss answers (rare lemmas) take longer.
        c.rag.update(k=2, kb_size=1000, max_eval_questions=200, new_info_passages=40,
                     question_kinds=("hypernym",), train_distractors="random",
                     max_train_questions=40_000)
    if arg.hf:  # A pre-trained BERT as the generator (UniLM: BERT weights, prefix-LM).
        common.apply_hf(c, arg.hf)  # Its max_len too (>= seq_len).
    if arg.gen:  # A pre-trained chat decoder, zero-shot: the generator stages are skipped.
        if arg.gen not in common.DECODERS:
            raise ValueError(f"configs/rag.py: gen={arg.gen!r}; known: {sorted(common.DECODERS)}")
        c.rag.update(generator=f"gguf:{arg.gen}", generator_max_new_tokens=24,
                     decode_batch_size=16)
    return c
