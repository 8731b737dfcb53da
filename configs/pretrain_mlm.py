r"""Stage 2 — BERT-style masked-LM pre-training on WordNet's training-split text.

  python -m launch.main --config configs/pretrain_mlm.py --workdir runs/mlm
  python -m launch.main --config configs/pretrain_mlm.py:runlocal --workdir runs/mlm_local

The corpus is each training synset's gloss followed by its example sentences. Only the
training split's synsets are read (validation / test synsets never enter
pre-training); held-out MLM loss and accuracy are measured on the validation split with
fixed masks. Arguments: `runlocal`, `size=tiny|small|base|large`, `whole_word`,
`unilm=<p>`.

  python -m launch.main --config configs/pretrain_mlm.py:unilm=0.33 --workdir runs/unilm

`unilm=p` (UniLM, Dong et al. 2019; train/tasks/unilm.py) sets config.data.
prefix_lm_fraction = p: that fraction of training rows become prefix-LM rows (each packed
sequence split at a uniform point: a bidirectional prefix, then causal next-token
prediction), the rest stay masked-LM. It also sets config.model.attention_mask="prefix"
and heads ("mlm", "lm"); the loss is per predicted token of either kind, logged as
train/mlm_loss and train/lm_loss. Held-out evaluation stays pure MLM (comparable across
p), and the checkpoint initialises a RAG generator (configs/rag.py, --config.init_from).
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, size="small", whole_word=False, unilm=0.0)
    c = common.base_config()
    c.task = "mlm"
    c.model = common.model_config(arg.size, heads=("mlm",), max_len=128)
    c.model.vocab_size = c.data.get_ref("vocab_size")
    c.data.source = "wordnet"
    c.data.wordnet_text = "gloss_and_examples"  # Glosses and example sentences.
    c.data.seq_len = 128
    c.data.packing = True  # Many short glosses per row: no compute spent on padding.
    c.data.batch_size = 32
    c.data.mlm_rate = 0.15
    c.data.mlm_whole_word = arg.whole_word
    c.data.mlm_dynamic = True
    if arg.unilm:  # Prefix-LM rows: a per-sequence prefix mask and the tied LM head too.
        c.data.prefix_lm_fraction = arg.unilm
        c.model.heads = ("mlm", "lm")
        c.model.attention_mask = "prefix"
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 500
    c.train.num_steps = 5000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.best_metric = "eval/loss"
    c.train.best_mode = "min"
    if arg.runlocal:
        common.apply_runlocal(c)
        c.data.batch_size = 8
    return c
