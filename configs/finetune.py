r"""Stage 3 — fine-tuning on WordNet supersense classification, with parameter masking.

  python -m launch.main --config configs/pretrain_mlm.py --workdir runs/mlm
  python -m launch.main --config configs/finetune.py:method=linear_probe \
      --config.init_from=runs/mlm --workdir runs/ft_probe

Arguments: `method=` one of METHODS, `size=...` (must match the pre-trained model),
`freeze_blocks=k` (method=freeze: the bottom k blocks, plus the embeddings unless
`freeze_embeddings=False`), `norm_offsets` (method=bitfit: also train LayerNorm
offsets), `lora_rank=r`, `lora_alpha=a`, `lora_targets=query|value` (method=lora),
`prompt_length=p` (method=prompt_tuning), `prefix_length=p` and `prefix_mlp_dim=d`
(method=prefix_tuning; d > 0: prefixes from Li & Liang's MLP, folded into plain prefixes
after training by model/prefix.py), `adapter_dim=m` and `adapter_norms`
(method=adapters; default on, as Houlsby et al.: LayerNorms train too), `layer_decay=d`
(method=layerwise_lr_decay: full fine-tuning, block i from the top at lr * d^i, ELECTRA
style), `lr_scale=s` (multiplies the method's default learning rate, METHOD_LR; small
models take larger steps), `runlocal`, `hf=minilm` (start from a pre-trained Hugging
Face BERT: its architecture from common.PRETRAINED, its WordPiece vocabulary,
init_from=hf:minilm and mean pooling, as it was trained; `hf=<dir>` sets init_from and
the vocabulary only, and the start-up check names the `--config.model.*` overrides its
config.json needs).
Each method is a list of `optim.param_rules`: ordered (regex, lr multiplier) pairs over
parameter paths, 0.0 = frozen (train/param_rules.py).
The parameter-efficient methods (lora, ia3, prompt_tuning, prefix_tuning, adapters) also
add their parameters to the model (`method_model_fields`; all but the two tuning methods
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

EMBEDDINGS = r"encoder/(token_embed|position_embed|type_embed|embed_norm)/.*"
HEAD = r"classify_head/.*"
NORMS = r".*norm/(scale|bias)"
# The new parameters each parameter-efficient method trains (with the head).
PEFT_PARAMS = {
    "lora": r".*/lora_[ab]",
    "ia3": r".*/ia3_(key|value|mlp)",
    "prompt_tuning": r"encoder/prompt",
    "prefix_tuning": r".*/prefix_(key|value)|encoder/prefix_mlp/.*",
    "adapters": r"encoder/block_\d+/(attention|mlp)_adapter/.*",
}
METHODS = ("full", "linear_probe", "freeze", "bitfit", *PEFT_PARAMS, "layerwise_lr_decay")
# Default learning rate by method: few trained parameters take larger steps.
# Adapters train every LayerNorm too (Houlsby et al.), which larger steps destabilise.
METHOD_LR = {"full": 2e-4, "freeze": 2e-4, "layerwise_lr_decay": 2e-4, "adapters": 5e-4}


def method_rules(arg, num_layers):
    """The `optim.param_rules` that make each fine-tuning method."""
    if arg.method in ("full", "layerwise_lr_decay"):  # The latter sets optim.layerwise_lr_decay.
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
        return ((HEAD, 1.0),
                (r".*norm/bias", 1.0 if arg.norm_offsets else 0.0),
                (r".*/bias", 1.0),
                (r".*", 0.0))
    if arg.method == "adapters":  # Houlsby et al. also train every LayerNorm.
        return ((PEFT_PARAMS["adapters"], 1.0), (HEAD, 1.0),
                (NORMS, 1.0 if arg.adapter_norms else 0.0), (r".*", 0.0))
    if arg.method in PEFT_PARAMS:
        return ((PEFT_PARAMS[arg.method], 1.0), (HEAD, 1.0), (r".*", 0.0))
    raise ValueError(f"method={arg.method!r}; expected one of {', '.join(METHODS)}")


def method_model_fields(arg):
    """The `config.model` fields that add a parameter-efficient method's parameters."""
    if arg.method == "lora":
        return dict(lora_rank=arg.lora_rank, lora_alpha=arg.lora_alpha,
                    lora_targets=arg.lora_targets)
    if arg.method == "ia3":
        return dict(ia3=True)
    if arg.method == "prompt_tuning":
        return dict(prompt_length=arg.prompt_length)
    if arg.method == "prefix_tuning":
        return dict(prefix_length=arg.prefix_length, prefix_mlp_dim=arg.prefix_mlp_dim)
    if arg.method == "adapters":
        return dict(adapter_dim=arg.adapter_dim)
    return {}


def get_config(arg=None):
    arg = common.parse_arg(arg, method="full", size="mini", runlocal=False, freeze_blocks=2,
                           freeze_embeddings=True, norm_offsets=False, lora_rank=8,
                           lora_alpha=16.0, lora_targets="query|value", prompt_length=20,
                           prefix_length=20, prefix_mlp_dim=0, adapter_dim=64,
                           adapter_norms=True, layer_decay=0.75, lr_scale=1.0, hf="")
    c = scratch.get_config(f"size={arg.size}" + (",runlocal" if arg.runlocal else ""))
    c.optim.param_rules = method_rules(arg, c.model.num_layers)
    c.model.update(method_model_fields(arg))
    c.optim.lr = METHOD_LR.get(arg.method, 1e-3) * arg.lr_scale
    if arg.method == "layerwise_lr_decay":  # Full fine-tuning, lower blocks smaller steps.
        c.optim.layerwise_lr_decay = arg.layer_decay
    c.optim.warmup_steps = 10 if arg.runlocal else 100
    c.train.num_steps = c.train.num_steps if arg.runlocal else 1000
    if arg.hf:
        c.init_from = f"hf:{arg.hf}"
        c.data.tokenizer, c.data.tokenizer_path = "wordpiece", f"hf:{arg.hf}"
        c.model.update(common.PRETRAINED.get(arg.hf, {}))
        c.data.vocab_size = c.model.vocab_size  # Unused by WordPiece; kept consistent.
        c.model.pooling = "mean"  # Sentence-embedding checkpoints are trained mean-pooled.
    return c
