r"""Stage 4 — retrieval-augmented generation on WordNet knowledge questions.

  python -m launch.main --config configs/rag.py --workdir runs/rag
  python -m launch.main --config configs/rag.py:runlocal --workdir runs/rag_local
  python -m launch.ask --workdir runs/rag "What is a poodle a kind of?"
  # Starting the generator from the MLM checkpoint (same size and tokenizer):
  python -m launch.main --config configs/rag.py --config.init_from=runs/mlm --workdir W
  # SmolLM2-135M-Instruct answering zero-shot from the retrieved passages (no training):
  python -m launch.main --config configs/rag.py:runlocal,gen=smollm2 --workdir runs/rag_smol
  # The same decoder fine-tuned RAFT style with LoRA on the ChatML prompts first:
  python -m launch.main --config configs/rag.py:runlocal,gen=smollm2,method=lora \
      --workdir runs/rag_smol_lora

One knowledge-base passage per synset, questions whose answer one passage states
(retrieval/wordnet_qa.py), an all-MiniLM-L6-v2 retriever over a ScaNN index, and the
shared transformer as a prefix-LM generator trained RAFT style through the normal loop
(task "prefix_lm"); retrieval/rag_run.py runs it all and writes results.json.
Arguments: `runlocal` (a 1,000-passage KB, hypernym questions, a tiny model: minutes on
a CPU), `size=`, `hf=minilm` (the generator starts from all-MiniLM-L6-v2 and its WordPiece
vocabulary: UniLM's BERT-initialised prefix-LM), `gen=smollm2` (no generator training:
SmolLM2-135M-Instruct from its GGUF file answers zero-shot from a ChatML prompt holding
the k numbered passages, greedy, at most 24 new tokens; retrieval/chat_generator.py),
`gen=smollm2,method=lora` (the same decoder fine-tuned RAFT style on those ChatML prompts
first: `apply_chat_decoder`; any method of model/finetune_methods.py with its arguments).

`--config.rag.reretrieve_every=N` (0: off) re-retrieves during decoding: every N answer
pieces the unfinished answers search again with question + " " + the answer so far and
decode on over the newly packed passages (retrieval/rag.py `Rag`); results.json then adds
a "rag_reretrieve" mode, and launch.ask uses it.
"""

from configs import common, finetune
from model import finetune_methods


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, size="mini", hf="", gen="", method="",
                           **finetune_methods.ARGS)
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
    if arg.method and not arg.gen:
        raise ValueError(f"configs/rag.py: method={arg.method} fine-tunes a chat decoder; "
                         f"name one with gen= (known: {sorted(common.DECODERS)})")
    if arg.gen:
        apply_chat_decoder(c, arg)
    return c


def apply_chat_decoder(c, arg):
    """gen=<decoder>: a pre-trained chat decoder answers from a ChatML prompt holding the
    numbered passages (train/tasks/chat_prompt.py). Without method=: zero-shot, the
    generator stages skipped. With method= (lora, ...): fine-tuned RAFT style through the
    loop on the same ChatML prompts (data.prompt_format="chat"; the loss on the answer and
    its end-of-turn token), then asked exactly as zero-shot."""
    if arg.gen not in common.DECODERS:
        raise ValueError(f"configs/rag.py: gen={arg.gen!r}; known: {sorted(common.DECODERS)}")
    spec = f"gguf:{arg.gen}"
    # Both question kinds (results.json scores each): a pre-trained decoder knows the rare
    # lemmas that gloss questions ask for, which the tiny generator cannot learn.
    c.rag.update(generator_max_new_tokens=24, decode_batch_size=16,
                 question_kinds=("hypernym", "gloss"))
    if arg.runlocal:  # A 135M decoder answers about one question a second on a laptop CPU.
        c.rag.update(max_eval_questions=80, new_info_passages=20)
    if not arg.method:
        c.rag.generator = spec
        return
    if arg.method in ("linear_probe", "bitfit"):
        raise ValueError(f"configs/rag.py: method={arg.method} needs a classification head "
                         f"or biases, which a Llama decoder has none of")
    c.init_from = spec
    c.model = common.model_config("small", **common.DECODERS[arg.gen], heads=("lm",),
                                  dropout=0.0, attention_dropout=0.0, max_len=512)
    method = finetune.apply_method(c, arg, head=False)
    c.data.update(tokenizer="gguf", tokenizer_path=spec, vocab_size=c.model.vocab_size,
                  # seq_len: 99% of k=2 chat rows fit 158 tokens; a longer one drops its
                  # last passage.
                  prompt_format="chat", seq_len=176, max_answer_tokens=12, batch_size=8,
                  eval_batch_size=16)
    c.optim.update(lr=1e-4 if method.whole_model else 1e-3, warmup_steps=20)
    c.train.update(num_steps=1000, eval_every=250, checkpoint_every=250, eval_steps=4,
                   final_eval_steps=8, report_forgetting=False)
    if arg.runlocal:  # 800 examples: about 20 minutes of LoRA on a 2-core CPU.
        c.train.update(num_steps=100, eval_every=50, checkpoint_every=50, eval_steps=2,
                       final_eval_steps=5)
