"""The table of fine-tuning methods: every `method=` of configs/finetune.py (and
configs/retriever.py), in one place.

An entry (`Method`) holds what a method is:
  args        the colon arguments it takes, with their defaults (`lora_rank=8`, ...);
  model       args -> the `config.model` fields that add its parameters (PEFT methods);
  rules       (args, num_layers) -> its `optim.param_rules` (train/param_rules.py): ordered
              (regex, lr multiplier) pairs over parameter paths, 0.0 = frozen; the
              classification head's rules included (`param_rules(..., head=False)` drops
              them);
  optim       args -> other `config.optim` fields it sets (layerwise_lr_decay's decay);
  lr          its default learning rate: few trained parameters take larger steps;
  whole_model it trains the pre-trained weights wholesale (all, or all above the frozen
              blocks): configs that start from a pre-trained encoder take small steps;
  off         the model fields that remove its modules (PEFT methods; PEFT_OFF joins them);
  params      a regex over the paths of the parameters it adds (PEFT methods);
  merges      launch/export.py can write it as a plain BertModel: nothing to merge, or
              merged into the base kernels (LoRA, (IA)^3; model/hf_bert.py merge_peft).
              Prompts, prefixes (even Li & Liang's MLP folded by model/prefix.py) and
              adapters add computation BERT lacks: export refuses them;
  replaces    methods whose modules this one's take the place of (P-tuning's prompt
              encoder makes prompt tuning's vectors): `active` names only this one.
The callables take this method's args only, as given or defaulted (`Method.arguments`).

Adding a method: its module (model/), its model fields (model/config.py), one entry here.
Standard library only: configs/ reads this table without importing JAX.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

EMBEDDINGS = r"encoder/(token_embed|patch_embed|position_embed|type_embed|embed_norm)/.*"
HEAD = r"classify_head/.*"  # The classification head: pooler + classifier.
NORMS = r".*norm/(scale|bias)"
ADAPTERS = r"encoder/block_\d+/(attention|mlp)_adapter/.*"


@dataclasses.dataclass(frozen=True)
class Method:
    """One fine-tuning method; see the module docstring for the fields."""

    name: str
    lr: float = 1e-3
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rules: Callable[[Mapping, int], tuple] = lambda args, num_layers: ()
    model: Callable[[Mapping], dict] = lambda args: {}
    optim: Callable[[Mapping], dict] = lambda args: {}
    whole_model: bool = False
    off: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    params: str = ""
    merges: bool = True
    replaces: tuple = ()  # Methods whose modules this one's take the place of.

    def arguments(self, given=None):
        """This method's arguments: `given`'s values (a dict or ConfigDict holding any
        arguments) where it has them, else the defaults."""
        given = {} if given is None else given
        return {k: given[k] if k in given else v for k, v in self.args.items()}

    def param_rules(self, given, num_layers, head=True):
        """`optim.param_rules` for a model of `num_layers` blocks; head=False drops the
        classification head's rules (a model without one: the retriever)."""
        rules = self.rules(self.arguments(given), num_layers)
        return tuple(r for r in rules if head or r[0] != HEAD)

    def model_fields(self, given=None):
        """The `config.model` fields that add this method's parameters ({}: none)."""
        return self.model(self.arguments(given))

    def optim_fields(self, given=None):
        """The `config.optim` fields besides param_rules and lr it sets ({}: none)."""
        return self.optim(self.arguments(given))


def _peft(name, params, off, merges, **fields):
    """A parameter-efficient method: by default only its new parameters and the head
    train."""
    fields.setdefault("rules", lambda args, num_layers: ((params, 1.0), (HEAD, 1.0),
                                                         (r".*", 0.0)))
    return Method(name, params=params, off=off, merges=merges, **fields)


def _freeze_rules(args, num_layers):
    """The bottom `freeze_blocks` blocks, and the embeddings unless told otherwise."""
    if not 0 <= args["freeze_blocks"] <= num_layers:
        raise ValueError(f"freeze_blocks={args['freeze_blocks']} outside [0, {num_layers}]")
    rules = [(EMBEDDINGS, 0.0)] if args["freeze_embeddings"] else []
    if args["freeze_blocks"]:
        blocks = "|".join(str(i) for i in range(args["freeze_blocks"]))
        rules.append((rf"encoder/block_({blocks})/.*", 0.0))
    return tuple(rules)


def _bitfit_rules(args, num_layers):
    """Biases (and optionally LayerNorm offsets) plus the head."""
    return ((HEAD, 1.0),
            (r".*norm/bias", 1.0 if args["norm_offsets"] else 0.0),
            (r".*/bias", 1.0),
            (r".*", 0.0))


def _adapter_rules(args, num_layers):
    """Houlsby et al. also train every LayerNorm."""
    return ((ADAPTERS, 1.0), (HEAD, 1.0),
            (NORMS, 1.0 if args["adapter_norms"] else 0.0), (r".*", 0.0))


# Order: the whole-model methods, then the PEFT ones (the stages ablation's report order).
METHODS = {m.name: m for m in (
    Method("full", lr=2e-4, whole_model=True),
    # Only the classification head (pooler + classifier).
    Method("linear_probe", rules=lambda args, num_layers: ((r"encoder/.*", 0.0),)),
    Method("freeze", lr=2e-4, whole_model=True,
           args=dict(freeze_blocks=2,  # The bottom k blocks...
                     freeze_embeddings=True),  # ...and the embeddings.
           rules=_freeze_rules),
    Method("bitfit", args=dict(norm_offsets=False),  # Also train LayerNorm offsets.
           rules=_bitfit_rules),
    # Full fine-tuning, block i from the top at lr * layer_decay^i (ELECTRA style).
    Method("layerwise_lr_decay", lr=2e-4, whole_model=True, args=dict(layer_decay=0.75),
           optim=lambda args: dict(layerwise_lr_decay=args["layer_decay"])),
    _peft("lora", r".*/lora_[ab]", off=dict(lora_rank=0), merges=True,
          args=dict(lora_rank=8, lora_alpha=16.0, lora_targets="query|value"),
          model=lambda args: dict(lora_rank=args["lora_rank"], lora_alpha=args["lora_alpha"],
                                  lora_targets=args["lora_targets"])),
    # Larger steps destabilise the LayerNorms adapters train too (Houlsby et al.).
    _peft("adapters", ADAPTERS, off=dict(adapter_dim=0), merges=False, lr=5e-4,
          args=dict(adapter_dim=64, adapter_norms=True),
          model=lambda args: dict(adapter_dim=args["adapter_dim"]), rules=_adapter_rules),
    _peft("ia3", r".*/ia3_(key|value|mlp)", off=dict(ia3=False), merges=True,
          model=lambda args: dict(ia3=True)),
    _peft("prompt_tuning", r"encoder/prompt", off=dict(prompt_length=0), merges=False,
          args=dict(prompt_length=20),
          model=lambda args: dict(prompt_length=args["prompt_length"])),
    # P-tuning: prompt vectors from a trainable prompt encoder (an MLP over free inputs),
    # folded into plain prompt vectors after training (model/prefix.py).
    _peft("p_tuning", r"encoder/prompt_encoder/.*", off=dict(prompt_encoder_dim=0),
          merges=False, replaces=("prompt_tuning",),
          args=dict(prompt_length=20, prompt_encoder_dim=128),
          model=lambda args: dict(prompt_length=args["prompt_length"],
                                  prompt_encoder_dim=args["prompt_encoder_dim"])),
    # prefix_mlp_dim > 0: prefixes from Li & Liang's MLP, folded into plain prefixes after
    # training (model/prefix.py).
    _peft("prefix_tuning", r".*/prefix_(key|value)|encoder/prefix_mlp/.*",
          off=dict(prefix_length=0), merges=False,
          args=dict(prefix_length=20, prefix_mlp_dim=0),
          model=lambda args: dict(prefix_length=args["prefix_length"],
                                  prefix_mlp_dim=args["prefix_mlp_dim"])),
)}

# Every method's arguments with their defaults: the colon arguments a fine-tuning config
# accepts besides `method=`.
ARGS = {k: v for m in METHODS.values() for k, v in m.args.items()}
# The parameters each PEFT method adds.
PEFT_PARAMS = {name: m.params for name, m in METHODS.items() if m.params}
# Model fields that remove every fine-tuning module: the plain pre-trained model.
PEFT_OFF = {k: v for m in METHODS.values() for k, v in m.off.items()}


def get(name):
    """The table's entry for `name`; an unknown name fails listing the methods."""
    if name not in METHODS:
        raise ValueError(f"method={name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def active(model_cfg):
    """Names of the methods whose modules `model_cfg` adds (a dict, ConfigDict or
    resolved model config); a field it lacks counts as off."""
    def value(key, off):
        if isinstance(model_cfg, Mapping) or hasattr(model_cfg, "to_dict"):
            return model_cfg.get(key, off)
        return getattr(model_cfg, key, off)
    on = [name for name, m in METHODS.items()
          if any(value(k, off) != off for k, off in m.off.items())]
    replaced = {r for name in on for r in METHODS[name].replaces}
    return tuple(name for name in on if name not in replaced)
