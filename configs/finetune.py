r"""Stage 3 — fine-tuning on WordNet supersense classification, with parameter masking.

  python -m launch.main --config configs/pretrain_mlm.py --workdir runs/mlm
  python -m launch.main --config configs/finetune.py:method=linear_probe \
      --config.init_from=runs/mlm --workdir runs/ft_probe

Arguments: `method=full|linear_probe|freeze|bitfit`, `size=...` (must match the
pre-trained model), `freeze_blocks=k` (method=freeze: the bottom k blocks, plus the
embeddings unless `freeze_embeddings=False`), `norm_offsets` (method=bitfit: also train
LayerNorm offsets), `runlocal`. Each method is a list of `optim.param_rules`: ordered
(regex, lr multiplier) pairs over parameter paths, 0.0 = frozen (train/param_rules.py).
"""

from configs import common, scratch

EMBEDDINGS = r"encoder/(token_embed|position_embed|type_embed|embed_norm)/.*"


def method_rules(arg, num_layers):
    """The `optim.param_rules` that make each fine-tuning method."""
    if arg.method == "full":
        return ()
    if arg.method == "linear_probe":  # Only the classification head (pooler + classifier).
        return ((r"encoder/.*", 0.0),)
    if arg.method == "freeze":
        if not 0 <= arg.freeze_blocks <= num_layers:
            raise ValueError(f"freeze_blocks={arg.freeze_blocks} outside [0, {num_layers}]")
        rules = [(EMBEDDINGS, 0.0)] if arg.freeze_embeddings else []
        if arg.freeze_blocks:
            blocks = "|".join(str(i) for i in range(arg.freeze_blocks))
            rules.append((rf"encoder/block_({blocks})/.*", 0.0))
        return tuple(rules)
    if arg.method == "bitfit":  # Biases (and optionally norm offsets) plus the head.
        return ((r"classify_head/.*", 1.0),
                (r".*norm/bias", 1.0 if arg.norm_offsets else 0.0),
                (r".*/bias", 1.0),
                (r".*", 0.0))
    raise ValueError(
        f"method={arg.method!r}; expected one of full, linear_probe, freeze, bitfit")


def get_config(arg=None):
    arg = common.parse_arg(arg, method="full", size="mini", runlocal=False, freeze_blocks=2,
                           freeze_embeddings=True, norm_offsets=False)
    c = scratch.get_config(f"size={arg.size}" + (",runlocal" if arg.runlocal else ""))
    c.optim.param_rules = method_rules(arg, c.model.num_layers)
    c.optim.lr = 1e-3 if arg.method in ("linear_probe", "bitfit") else 2e-4
    c.optim.warmup_steps = 10 if arg.runlocal else 100
    c.train.num_steps = c.train.num_steps if arg.runlocal else 1000
    return c
