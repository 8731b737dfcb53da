r"""Stage 1 — training from scratch: classify WordNet glosses into the 45 supersenses.

  python -m launch.main --config configs/scratch.py --workdir runs/scratch
  python -m launch.main --config configs/scratch.py:runlocal --workdir runs/scratch_local
  python -m launch.main --config configs/scratch.py:size=base --workdir W --dry_run

Arguments: `runlocal` (seconds-long CPU run), `size=tiny|mini|small|base|large`.
"""

from configs import common


def get_config(arg=None):
    # "mini" keeps the default run to minutes on a 2-core CPU; size=small|base for more.
    arg = common.parse_arg(arg, runlocal=False, size="mini")
    c = common.base_config()
    c.task = "classify"
    c.model = common.model_config(arg.size, heads=("classify",), num_classes=45,
                                  max_len=128, dropout=0.1, attention_dropout=0.1)
    if arg.size == "base":  # BERT-base: the 30522-piece vocabulary, 512 positions, 2 types.
        c.data.vocab_size = 30522
        c.model.max_len = 512
        c.model.type_vocab_size = 2
    # One vocabulary size: the tokenizer's decides the model's.
    c.model.vocab_size = c.data.get_ref("vocab_size")
    c.data.source = "wordnet"
    c.data.text_key = "text"  # The gloss.
    c.data.label_key = "label"  # The lexicographer file (supersense).
    c.data.seq_len = 48  # Covers 98% of glosses (median 13 pieces).
    c.data.batch_size = 64
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 0.01
    c.train.num_steps = 1500  # About one epoch of the 94.5k training glosses at batch 64.
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.class_weighted_loss = False
    if arg.runlocal:
        common.apply_runlocal(c)
    return c
