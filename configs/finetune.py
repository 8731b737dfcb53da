r"""Stage 3 — fine-tuning on WordNet supersense classification, with parameter masking.

  python -m launch.main --config configs/pretrain_mlm.py --workdir runs/mlm
  python -m launch.main --config configs/finetune.py:method=linear_probe \
      --config.init_from=runs/mlm --workdir runs/ft_probe

Arguments: `method=` one of METHODS (the table of fine-tuning methods,
model/finetune_methods.py: each method's arguments, rules, model fields and learning
rate), `size=...` (must match the pre-trained model),
`freeze_blocks=k` (method=freeze: the bottom k blocks, plus the embeddings unless
`freeze_embeddings=False`), `norm_offsets` (method=bitfit: also train LayerNorm
offsets), `lora_rank=r`, `lora_alpha=a`, `lora_targets=query|value` (method=lora),
`prompt_length=p` (method=prompt_tuning), `prefix_length=p` and `prefix_mlp_dim=d`
(method=prefix_tuning; d > 0: prefixes from Li & Liang's MLP, folded into plain prefixes
after training by model/prefix.py), `adapter_dim=m` and `adapter_norms`
(method=adapters; default on, as Houlsby et al.: LayerNorms train too), `layer_decay=d`
(method=layerwise_lr_decay: full fine-tuning, block i from the top at lr * d^i, ELECTRA
style), `lr_scale=s` (multiplies the method's default learning rate, the table's `lr`;
small models take larger steps), `runlocal`, `hf=minilm` (start from a pre-trained Hugging
Face BERT: its architecture from common.PRETRAINED, its WordPiece vocabulary,
init_from=hf:minilm and mean pooling, as it was trained; `hf=<dir>` sets init_from and
the vocabulary only, and the start-up check names the `--config.model.*` overrides its
config.json needs).
Each method is a list of `optim.param_rules`: ordered (regex, lr multiplier) pairs over
parameter paths, 0.0 = frozen (train/param_rules.py).
The parameter-efficient methods (lora, ia3, prompt_tuning, prefix_tuning, adapters) also
add their parameters to the model (the table's model fields; all but the two tuning methods
start exactly at the pre-trained model); only those and the classification head train.

Options any method takes as `--config.` overrides (configs/common.py):
`data.label_fraction=0.1` (stratified subset of the labelled training split; results.json
reports it and the examples used under "data"), `data.sampling=class_balanced` (classes
drawn equally often, train/data/sampling.py), `data.token_dropout` /
`data.token_substitution` (training-only text augmentation, train/data/augmentation.py),
`train.class_weighted_loss=True`, and `optim.l2_strength` / `optim.l1_strength` with
`optim.regularize_toward=zero|init` (init = L2-SP toward the loaded init_from weights, the
new head toward zero; train/regularizers.py).
"""

from configs import common, scratch
from model import finetune_methods

# The table's names (model/finetune_methods.py), where configs and tests have read them.
METHODS = tuple(finetune_methods.METHODS)
PEFT_PARAMS = finetune_methods.PEFT_PARAMS
EMBEDDINGS, HEAD, NORMS = finetune_methods.EMBEDDINGS, finetune_methods.HEAD, finetune_methods.NORMS


def parse_method_arg(arg, **defaults):
    """`common.parse_arg` over `method=` (default full), every method's arguments with
    their defaults (the table's ARGS) and the config's own `defaults`."""
    return common.parse_arg(arg, method="full", **finetune_methods.ARGS, **defaults)


def apply_method(c, arg, head=True):
    """Sets what `arg.method` makes on config `c` (its param_rules for c.model's blocks,
    model fields and optim fields); -> its table entry, for its learning rate.
    head=False drops the classification head's rules (a model without one)."""
    method = finetune_methods.get(arg.method)
    c.optim.param_rules = method.param_rules(arg, c.model.num_layers, head=head)
    c.model.update(method.model_fields(arg))
    c.optim.update(method.optim_fields(arg))
    return method


def get_config(arg=None):
    arg = parse_method_arg(arg, size="mini", runlocal=False, lr_scale=1.0, hf="")
    c = scratch.get_config(f"size={arg.size}" + (",runlocal" if arg.runlocal else ""))
    method = apply_method(c, arg)
    c.optim.lr = method.lr * arg.lr_scale
    c.optim.warmup_steps = 10 if arg.runlocal else 100
    c.train.num_steps = c.train.num_steps if arg.runlocal else 1000
    if arg.hf:  # Sentence-embedding checkpoints are trained mean-pooled.
        common.apply_hf(c, arg.hf, pooling="mean")
    return c
