"""The one transformer every stage shares: embeddings, N blocks, and task heads.

Linen modules; the compiled steps call `Model.apply` on a params pytree. Every parameter
and main activation carries logical axis names (`embed`, `heads`, `mlp`, `vocab`, ...)
that `config.logical_axis_rules` maps onto the (data, fsdp, tensor) mesh.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from model import initializers, lora, multitask, patches
from model.attention import Linear, MultiHeadAttention, make_attention_mask
from model.pooling import pool

HEADS = ("classify", "mlm", "lm", "pixels")
IMAGE_HEADS = ("classify", "pixels")  # What an image encoder (patch_size > 0) feeds.
# Which activations a rematerialised block keeps for the backward pass (None: none).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")


NORM_TYPES = ("layernorm", "rmsnorm")
MLP_ACTIVATIONS = ("gelu", "swiglu")


def layer_norm(cfg, name):
    """BERT's LayerNorm (scale, bias) or Llama's RMSNorm (scale only), per cfg.norm_type."""
    if cfg.norm_type == "rmsnorm":
        return nn.RMSNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype,
                          scale_init=initializers.ones(("norm",)), name=name)
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        scale_init=initializers.ones(("norm",)), bias_init=initializers.zeros(("norm",)),
        name=name,
    )


def dense(cfg, features, axes, name):
    return nn.Dense(
        features, kernel_init=initializers.kernel(cfg.init, cfg.init_std, axes),
        bias_init=initializers.zeros(axes[-1:]), dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, name=name,
    )


class Mlp(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, x, deterministic=True):
        cfg = self.cfg
        h = self.projection(cfg.mlp_dim, ("embed", "mlp"), "wi")(x, deterministic)
        if cfg.mlp_activation == "swiglu":  # Shazeer 2020: silu(gate) * wi (Llama's "up").
            gate = self.projection(cfg.mlp_dim, ("embed", "mlp"), "gate")(x, deterministic)
            h = nn.silu(gate) * h
        else:
            h = nn.gelu(h, approximate=False)
        h = nn.with_logical_constraint(
            h, ("activation_batch", "activation_length", "activation_mlp")
        )
        h = self.adapt_hidden(h)
        # No dropout on the [batch, seq, mlp] hidden (as BERT): it would draw 4x the random
        # bits of the residual dropout for no documented gain.
        return self.projection(x.shape[-1], ("mlp", "embed"), "wo")(h, deterministic)

    def projection(self, features, axes, name):
        """A dense layer (params `kernel`, `bias`, as nn.Dense) that LoRA can target."""
        cfg, spec = self.cfg, lora.spec(self.cfg)
        return Linear((features,), axes, init=cfg.init, init_std=cfg.init_std,
                      dtype=cfg.dtype, param_dtype=cfg.param_dtype, use_bias=cfg.use_bias,
                      lora=spec.for_projection(name) if spec else None, name=name)

    def adapt_hidden(self, h):
        """Hook for methods that rescale MLP hidden activations (PEFT).

        (IA)^3: h [batch, seq, mlp] times a learned `ia3_mlp` [mlp], initialised to one.
        """
        if self.cfg.ia3:
            scale = self.param("ia3_mlp", initializers.ones(("mlp",)), (self.cfg.mlp_dim,),
                               self.cfg.param_dtype)
            h = h * scale.astype(h.dtype)
        return h


class Adapter(nn.Module):
    """Houlsby et al. 2019 bottleneck adapter: h + up(gelu(down(h))) on [..., embed].

    down [embed, adapter_dim], up [adapter_dim, embed]; `up` starts at zero, so the adapter
    starts as the identity (step 0 = the base model).
    """

    cfg: Any

    @nn.compact
    def __call__(self, h):
        cfg = self.cfg
        z = nn.gelu(dense(cfg, cfg.adapter_dim, ("embed", None), "down")(h), approximate=False)
        up = nn.Dense(h.shape[-1], kernel_init=initializers.zeros((None, "embed")),
                      bias_init=initializers.zeros(("embed",)), dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, name="up")
        return h + up(z)


class Block(nn.Module):
    """One transformer block; `cfg.norm` picks pre-LN or post-LN (original BERT)."""

    cfg: Any

    @nn.compact
    def __call__(self, x, mask, deterministic=True, decode=False, prefix_kv=None,
                 segment_ids=None, positions=None, task_ids=None):
        cfg = self.cfg
        attention = MultiHeadAttention(
            num_heads=cfg.num_heads, head_dim=cfg.head_dim, max_len=cfg.max_len,
            init=cfg.init, init_std=cfg.init_std, dropout_rate=cfg.attention_dropout,
            impl=cfg.attention_impl, mask_mode=cfg.attention_mask,
            dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            lora=lora.spec(cfg), ia3=cfg.ia3, prefix_length=cfg.prefix_length,
            rope=uses_rope(cfg), rope_theta=cfg.rope_theta, num_kv_heads=cfg.num_kv_heads,
            use_bias=cfg.use_bias, name="attention",
        )
        mlp = Mlp(cfg, name="mlp")
        drop = nn.Dropout(cfg.dropout)
        if cfg.norm == "pre":
            h = attention(layer_norm(cfg, "attention_norm")(x), mask,
                          deterministic=deterministic, decode=decode, prefix_kv=prefix_kv,
                          segment_ids=segment_ids, positions=positions)
            x = x + drop(self.adapt(h, "attention_adapter", task_ids),
                         deterministic=deterministic)
            h = mlp(layer_norm(cfg, "mlp_norm")(x), deterministic)
            x = x + drop(self.adapt(h, "mlp_adapter", task_ids), deterministic=deterministic)
        else:
            h = attention(x, mask, deterministic=deterministic, decode=decode,
                          prefix_kv=prefix_kv, segment_ids=segment_ids, positions=positions)
            h = self.adapt(h, "attention_adapter", task_ids)
            x = layer_norm(cfg, "attention_norm")(x + drop(h, deterministic=deterministic))
            h = self.adapt(mlp(x, deterministic), "mlp_adapter", task_ids)
            x = layer_norm(cfg, "mlp_norm")(x + drop(h, deterministic=deterministic))
        return nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)

    def adapt(self, h, name, task_ids=None):
        """A sub-layer's output [batch, seq, embed] through its adapter, if any (Houlsby
        places one after attention and one after the MLP, before the residual); with
        cfg.num_tasks, each row's task's adapter (model/multitask.py)."""
        if not self.cfg.adapter_dim:
            return h
        if self.cfg.num_tasks:
            task_ids = multitask.task_ids_or_fail(self, task_ids, h.shape[0])
            return multitask.TaskAdapter(self.cfg, name=name)(h, task_ids)
        return Adapter(self.cfg, name=name)(h)


POSITION_EMBEDDINGS = ("learned", "rope", "sincos2d")


def position_kind(cfg) -> str:
    kind = getattr(cfg, "position_embedding", "learned")  # Runs saved before it existed.
    if kind not in POSITION_EMBEDDINGS:
        raise ValueError(f"config.model.position_embedding={kind!r}; expected one of "
                         f"{POSITION_EMBEDDINGS}")
    return kind


def uses_rope(cfg) -> bool:
    return position_kind(cfg) == "rope"


class PatchEmbed(nn.Module):
    """ViT's input (Dosovitskiy et al. 2021): pixels [batch, H, W, C] -> [batch, 1 + N,
    hidden], a learned [CLS] vector then each of the N patches' linear projection
    (`projection`: p*p*C -> hidden). SimMIM (Xie et al. 2022): the patches at
    `mask_positions` [batch, P] (sequence indices, 1..N) become the learned `mask` vector.
    The `mask` parameter exists when the model has the "pixels" head.
    """

    cfg: Any

    @nn.compact
    def __call__(self, pixels, mask_positions=None):
        cfg = self.cfg
        if pixels.ndim == 2:  # model_setup's shape-only init passes int ids [batch, seq].
            pixels = jnp.zeros((pixels.shape[0], *cfg.image_shape), cfg.dtype)
        if tuple(pixels.shape[1:]) != tuple(cfg.image_shape):
            raise ValueError(f"pixels of shape {tuple(pixels.shape)}; config.model."
                             f"image_shape={tuple(cfg.image_shape)} expects [batch, "
                             f"{', '.join(map(str, cfg.image_shape))}]")
        x = patches.patchify(pixels.astype(cfg.dtype), cfg.patch_size)
        x = dense(cfg, cfg.hidden, (None, "embed"), "projection")(x)
        cls = self.param("cls", initializers.embedding(cfg.init_std, ("embed",)),
                         (cfg.hidden,), cfg.param_dtype)
        cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, cfg.hidden))
        x = jnp.concatenate([cls, x], axis=1)
        if "pixels" in cfg.heads:
            mask = self.param("mask", initializers.embedding(cfg.init_std, ("embed",)),
                              (cfg.hidden,), cfg.param_dtype)
            if mask_positions is not None:
                rows = jnp.arange(x.shape[0])[:, None]
                masked = jnp.zeros(x.shape[:2], bool).at[rows, mask_positions].set(True)
                x = jnp.where(masked[..., None], mask.astype(x.dtype), x)
        return x


def sincos_positions(cfg):
    """[1 + N, hidden]: zeros for [CLS] (as MAE), then the patches' 2-D sin-cos table."""
    rows, columns = patches.check_patch_size(cfg.image_shape, cfg.patch_size)
    table = patches.sincos_2d(rows, columns, cfg.hidden)
    return jnp.concatenate([jnp.zeros((1, cfg.hidden)), table]).astype(cfg.dtype)


class Encoder(nn.Module):
    """Embeddings and the block stack: tokens [batch, seq] -> hidden [batch, seq, embed]."""

    cfg: Any

    def setup(self):
        cfg = self.cfg
        if cfg.patch_size:  # Pixels in: patches instead of a vocabulary.
            self.patch_embed = PatchEmbed(cfg)
        else:
            self.token_embed = nn.Embed(
                cfg.vocab_size, cfg.hidden, embedding_init=initializers.embedding(
                    cfg.init_std, ("vocab", "embed")),
                dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            )
        # RoPE: positions enter in attention; sincos2d: a fixed table. Neither learns one.
        if position_kind(cfg) == "learned":
            self.position_embed = nn.Embed(
                cfg.max_len, cfg.hidden, embedding_init=initializers.embedding(
                    cfg.init_std, ("position", "embed")),
                dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            )
        if cfg.type_vocab_size:
            self.type_embed = nn.Embed(
                cfg.type_vocab_size, cfg.hidden, embedding_init=initializers.embedding(
                    cfg.init_std, ("position", "embed")),
                dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            )
        if cfg.prompt_length and cfg.prompt_encoder_dim:
            self.prompt_encoder = PromptEncoder(cfg)  # P-tuning.
        elif cfg.prompt_length:
            # Prompt tuning (Lester et al. 2021): p free input vectors, drawn like embeddings.
            self.prompt = self.param(
                "prompt", initializers.embedding(cfg.init_std, (None, "embed")),
                (cfg.prompt_length, cfg.hidden), cfg.param_dtype)
        if cfg.prefix_length and cfg.prefix_mlp_dim:
            self.prefix_mlp = PrefixMlp(cfg)
        # Post-LN (BERT) normalises the embeddings; pre-LN normalises the final output.
        self.norm = layer_norm(cfg, "embed_norm" if cfg.norm == "post" else "final_norm")
        self.dropout = nn.Dropout(cfg.dropout)
        block = Block
        if cfg.remat != "none":
            if cfg.remat not in REMAT_POLICIES:
                raise ValueError(
                    f"config.model.remat={cfg.remat!r}; expected one of {list(REMAT_POLICIES)}")
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat],
                             static_argnums=(3, 4))
        self.blocks = [block(cfg, name=f"block_{i}") for i in range(cfg.num_layers)]

    def __call__(self, tokens, *, segment_ids=None, positions=None, token_type_ids=None,
                 prefix_mask=None, attention_mask=None, deterministic=True, decode=False,
                 mask_positions=None, task_ids=None):
        """Args (all [batch, seq]): tokens; segment_ids (0 = padding, default: tokens != 0
        is not assumed, every token is real); positions (default 0..seq-1); token types;
        prefix_mask for prefix-LM. `attention_mask` [batch, 1, q, k] overrides the mask
        built from segment ids (the decoding loop passes the cache-wide mask).

        With `cfg.prompt_length` p > 0 the p prompt vectors are inserted after position 0
        (so [CLS] stays at 0 for pooling) into the embedded sequence, before the embedding
        norm; real tokens keep their position embeddings and prompts take none (they are
        free vectors). Prompts share the segment of the row's first token, so every token
        of that sequence attends to them (causal masks: tokens after them). The output is
        trimmed back to [batch, seq, embed]: heads see the original positions.

        With `cfg.patch_size` > 0 `tokens` are pixels [batch, H, W, C] (floats; gradients
        w.r.t. them are defined), the sequence is [CLS] + the N patches (seq = 1 + N), and
        `mask_positions` [batch, P] names the patches SimMIM masks (`PatchEmbed`).
        """
        cfg = self.cfg
        patch_embeddings = None
        if cfg.patch_size:
            patch_embeddings = self.patch_embed(tokens, mask_positions)
            tokens = jnp.ones(patch_embeddings.shape[:2], jnp.int32)  # Shapes the masks.
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if cfg.prompt_length:
            if decode or attention_mask is not None:
                raise ValueError("config.model.prompt_length > 0 supports neither decoding "
                                 "nor an explicit attention_mask")
            segment_ids = insert_after_first(segment_ids, segment_ids[:, :1], cfg.prompt_length)
            if prefix_mask is not None:  # Prompts belong to the bidirectional prefix.
                prefix_mask = insert_after_first(prefix_mask, True, cfg.prompt_length)
            block_positions = insert_after_first(positions, positions[:, :1], cfg.prompt_length)
        else:
            block_positions = positions
        # Attention kernels that build their own mask (splash) take the ids it came from.
        mask_segment_ids = segment_ids if attention_mask is None else None
        if attention_mask is None:
            attention_mask = make_attention_mask(segment_ids, cfg.attention_mask, prefix_mask)
        x = self.embed_tokens(tokens) if patch_embeddings is None else patch_embeddings
        if position_kind(cfg) == "learned":
            x = x + self.position_embed(positions)
        elif position_kind(cfg) == "sincos2d":
            x = x + sincos_positions(cfg)[positions]
        if cfg.type_vocab_size:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(tokens)
            x = x + self.type_embed(token_type_ids)
        if cfg.prompt_length:
            prompt = self.prompt_encoder() if cfg.prompt_encoder_dim else self.prompt
            x = insert_after_first(x, prompt.astype(x.dtype), cfg.prompt_length)
        x = nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)
        if cfg.norm == "post":
            x = self.norm(x)
        x = self.dropout(x, deterministic=deterministic)
        prefixes = [None] * cfg.num_layers
        if cfg.prefix_length and cfg.prefix_mlp_dim:
            prefixes = self.prefix_mlp()
        for block, prefix_kv in zip(self.blocks, prefixes):
            x = block(x, attention_mask, deterministic, decode, prefix_kv, mask_segment_ids,
                      block_positions, task_ids)
        if cfg.norm == "pre":
            x = self.norm(x)
        if cfg.prompt_length:  # Drop the prompts: heads see the input's positions.
            x = jnp.concatenate([x[:, :1], x[:, 1 + cfg.prompt_length:]], axis=1)
        return x

    def embed_tokens(self, tokens):
        return self.token_embed(tokens)

    def attend(self, x):
        """Tied output projection: hidden [..., embed] -> logits [..., vocab]."""
        return self.token_embed.attend(x)


class PrefixMlp(nn.Module):
    """Prefix tuning's reparameterisation (Li & Liang 2021, sec. 4.3): every layer's
    prefix keys and values come from one MLP over p free vectors, which trains more
    stably than free prefixes. After training, `model/prefix.py:fold_prefix_mlp` stores
    its outputs as plain per-layer prefixes and the MLP is dropped.

    Params: `embedding` [p, hidden], `hidden` (dense hidden -> prefix_mlp_dim, tanh),
    `output` (dense -> num_layers * 2 * heads * head_dim). Returns per layer a (keys,
    values) pair of [p, heads, head_dim].
    """

    cfg: Any

    @nn.compact
    def __call__(self):
        cfg = self.cfg
        p, heads, head_dim = cfg.prefix_length, cfg.num_kv_heads, cfg.head_dim
        embedding = self.param("embedding", initializers.embedding(cfg.init_std, (None, "embed")),
                               (p, cfg.hidden), cfg.param_dtype)
        h = jnp.tanh(dense(cfg, cfg.prefix_mlp_dim, ("embed", "mlp"), "hidden")(embedding))
        out = dense(cfg, cfg.num_layers * 2 * heads * head_dim, ("mlp", None), "output")(h)
        out = out.reshape(p, cfg.num_layers, 2, heads, head_dim).transpose(1, 2, 0, 3, 4)
        return [(out[i, 0], out[i, 1]) for i in range(cfg.num_layers)]


class PromptEncoder(nn.Module):
    """P-tuning's prompt encoder (Liu et al. 2021, "GPT Understands, Too"; its MLP form,
    as HF PEFT's `encoder_reparameterization_type="MLP"`): the p prompt vectors are an
    MLP of p free inputs, which trains more stably than free vectors. After training,
    `model/prefix.py:fold_prompt_encoder` stores its output as plain prompt vectors.

    Params: `embedding` [p, hidden], `hidden` (dense hidden -> prompt_encoder_dim, relu),
    `output` (dense -> hidden). Returns the prompt vectors [p, hidden].
    """

    cfg: Any

    @nn.compact
    def __call__(self):
        cfg = self.cfg
        inputs = self.param("embedding", initializers.embedding(cfg.init_std, (None, "embed")),
                            (cfg.prompt_length, cfg.hidden), cfg.param_dtype)
        h = nn.relu(dense(cfg, cfg.prompt_encoder_dim, ("embed", "mlp"), "hidden")(inputs))
        return dense(cfg, cfg.hidden, ("mlp", "embed"), "output")(h)


def insert_after_first(x, inserted, length):
    """x [batch, seq, ...] -> [batch, seq + length, ...] with `inserted` after position 0.

    `inserted` broadcasts to [batch, length, *x.shape[2:]]: a scalar, [batch, 1] for
    ids, or [length, embed] for the prompt vectors.
    """
    inserted = jnp.asarray(inserted, x.dtype)
    if inserted.ndim == x.ndim - 1:  # [length, ...]: shared by every row.
        inserted = inserted[None]
    inserted = jnp.broadcast_to(inserted, (x.shape[0], length, *x.shape[2:]))
    return jnp.concatenate([x[:, :1], inserted, x[:, 1:]], axis=1)


class ClassifyHead(nn.Module):
    """Sequence classification: pooled [CLS] (BERT pooler: dense + tanh) or mean."""

    cfg: Any

    @nn.compact
    def __call__(self, hidden, segment_ids, *, deterministic=True):
        cfg = self.cfg
        pooled = pool(hidden, segment_ids, cfg.pooling)
        pooled = jnp.tanh(dense(cfg, cfg.hidden, ("embed", "mlp"), "pooler")(pooled))
        pooled = nn.Dropout(cfg.dropout)(pooled, deterministic=deterministic)
        return dense(cfg, cfg.num_classes, ("mlp", "classes"), "classifier")(pooled)


class PixelHead(nn.Module):
    """Masked-patch reconstruction (SimMIM's one linear layer): hidden [..., embed] ->
    a patch's p*p*C (normalised) pixels."""

    cfg: Any

    @nn.compact
    def __call__(self, hidden):
        cfg = self.cfg
        size = cfg.patch_size * cfg.patch_size * cfg.image_shape[2]
        return dense(cfg, size, ("embed", None), "reconstruction")(hidden)


class MlmHead(nn.Module):
    """BERT's MLM head: dense + gelu + LN, then the decoder tied to the token embedding."""

    cfg: Any

    @nn.compact
    def __call__(self, hidden, attend):
        cfg = self.cfg
        if cfg.mlm_transform:
            hidden = dense(cfg, cfg.hidden, ("embed", "mlp"), "transform")(hidden)
            hidden = layer_norm(cfg, "transform_norm")(nn.gelu(hidden, approximate=False))
        bias = self.param("bias", initializers.zeros(("vocab",)), (cfg.vocab_size,),
                          cfg.param_dtype)
        return attend(hidden) + bias


class Model(nn.Module):
    """The encoder plus the heads named in `cfg.heads`.

    Returns a dict with "hidden" [batch, seq, embed] and, per head: "classify" [batch,
    classes]; "mlm" [batch, P, vocab] at `mlm_positions` [batch, P] (all positions if
    None: the head is only computed where the loss needs it, as BERT does); "lm"
    [batch, seq, vocab] (tied, no transform); "pixels" [batch, P, p*p*C] at
    `mlm_positions` (image input: those patches are masked in the input too).
    """

    cfg: Any

    def setup(self):
        cfg = self.cfg
        unknown = set(cfg.heads) - set(HEADS)
        if unknown:
            raise ValueError(f"config.model.heads has {sorted(unknown)}; expected from {HEADS}")
        self.encoder = Encoder(cfg)
        if "classify" in cfg.heads:  # One head per task with cfg.num_tasks.
            self.classify_head = (multitask.TaskClassifyHead if cfg.num_tasks
                                  else ClassifyHead)(cfg)
        if "mlm" in cfg.heads:
            self.mlm_head = MlmHead(cfg)
        if "pixels" in cfg.heads:
            self.pixel_head = PixelHead(cfg)
        if "lm" in cfg.heads and not cfg.tie_embeddings:
            self.lm_head = Linear((cfg.vocab_size,), ("embed", "vocab"), init=cfg.init,
                                  init_std=cfg.init_std, dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype, use_bias=False)

    def lm_logits(self, hidden):
        """The "lm" head: hidden [..., embed] -> logits [..., vocab], tied to the token
        embedding (cfg.tie_embeddings) or its own `lm_head`."""
        if self.cfg.tie_embeddings:
            return self.encoder.attend(hidden)
        return self.lm_head(hidden)

    def __call__(self, tokens, *, segment_ids=None, positions=None, token_type_ids=None,
                 prefix_mask=None, attention_mask=None, mlm_positions=None,
                 deterministic=True, decode=False, heads=None, task_ids=None):
        """`task_ids` [batch]: each row's task (cfg.num_tasks > 0, model/multitask.py)."""
        hidden = self.encoder(
            tokens, segment_ids=segment_ids, positions=positions,
            token_type_ids=token_type_ids, prefix_mask=prefix_mask,
            attention_mask=attention_mask, deterministic=deterministic, decode=decode,
            mask_positions=mlm_positions if self.cfg.patch_size else None,
            task_ids=task_ids,
        )
        if segment_ids is None:  # [batch, seq] (image input: seq = 1 + patches).
            segment_ids = jnp.ones(hidden.shape[:2], jnp.int32)
        outputs = {"hidden": hidden}
        for head in heads or self.cfg.heads:
            if head == "classify":
                routed = {"task_ids": task_ids} if self.cfg.num_tasks else {}
                outputs[head] = self.classify_head(hidden, segment_ids,
                                                   deterministic=deterministic, **routed)
            elif head == "mlm":
                selected = hidden
                if mlm_positions is not None:
                    selected = jnp.take_along_axis(hidden, mlm_positions[..., None], axis=1)
                outputs[head] = self.mlm_head(selected, self.encoder.attend)
            elif head == "lm":
                outputs[head] = self.lm_logits(hidden)
            elif head == "pixels":
                selected = hidden
                if mlm_positions is not None:
                    selected = jnp.take_along_axis(hidden, mlm_positions[..., None], axis=1)
                outputs[head] = self.pixel_head(selected)
        return outputs


def resolve(cfg):
    """Model ConfigDict -> a frozen, hashable copy with derived fields filled in."""
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    if cfg["head_dim"] in (-1, None):
        if cfg["hidden"] % cfg["num_heads"]:
            raise ValueError(
                f"config.model.hidden={cfg['hidden']} is not divisible by "
                f"config.model.num_heads={cfg['num_heads']}; set config.model.head_dim")
        cfg["head_dim"] = cfg["hidden"] // cfg["num_heads"]
    if cfg["norm"] not in ("pre", "post"):
        raise ValueError(f"config.model.norm={cfg['norm']!r}; expected 'pre' or 'post'")
    initializers.base(cfg["init"])  # Fails early on an unknown initialiser.
    lora.check(cfg)
    cfg.setdefault("prompt_encoder_dim", 0)  # Runs saved before P-tuning existed.
    cfg.setdefault("num_tasks", 0)  # Runs saved before task routing existed.
    cfg["task_classes"] = tuple(int(c) for c in cfg.get("task_classes", ()))
    multitask.check(cfg)
    for key in ("prompt_length", "prompt_encoder_dim", "prefix_length", "prefix_mlp_dim",
                "adapter_dim"):
        if cfg[key] < 0:
            raise ValueError(f"config.model.{key}={cfg[key]}; expected >= 0 (0 = off)")
    cfg["dtype"] = jnp.dtype(cfg["dtype"])
    cfg["param_dtype"] = jnp.dtype(cfg["param_dtype"])
    cfg["heads"] = tuple(cfg["heads"])
    cfg.setdefault("position_embedding", "learned")
    # Runs saved before the Llama options existed are BERT-family models.
    for key, default in (("norm_type", "layernorm"), ("mlp_activation", "gelu"),
                         ("num_kv_heads", -1), ("use_bias", True), ("rope_theta", 10_000.0),
                         ("tie_embeddings", True)):
        cfg.setdefault(key, default)
    for key, allowed in (("norm_type", NORM_TYPES), ("mlp_activation", MLP_ACTIVATIONS)):
        if cfg[key] not in allowed:
            raise ValueError(f"config.model.{key}={cfg[key]!r}; expected one of {allowed}")
    if cfg["num_kv_heads"] in (-1, None):
        cfg["num_kv_heads"] = cfg["num_heads"]
    if cfg["num_kv_heads"] < 1 or cfg["num_heads"] % cfg["num_kv_heads"]:
        raise ValueError(f"config.model.num_kv_heads={cfg['num_kv_heads']} must divide "
                         f"config.model.num_heads={cfg['num_heads']} (grouped-query "
                         f"attention: each key/value head serves a group of query heads)")
    check_image_input(cfg)
    fields = sorted(cfg)
    frozen = dataclasses.make_dataclass("ModelConfig", fields, frozen=True)(**cfg)
    uses_rope(frozen)  # Fails early on an unknown kind.
    return frozen


def check_image_input(cfg):
    """Image-input fields of a model-config dict, checked (and image_shape made a tuple)
    in place; a ValueError names the key."""
    cfg.setdefault("patch_size", 0)  # Runs saved before image input existed.
    cfg["image_shape"] = tuple(int(v) for v in cfg.get("image_shape", (0, 0, 0)))
    kind = cfg["position_embedding"]
    if not cfg["patch_size"]:
        for what, bad in (("position_embedding='sincos2d'", kind == "sincos2d"),
                          ("the 'pixels' head", "pixels" in cfg["heads"])):
            if bad:
                raise ValueError(f"config.model: {what} needs image input "
                                 f"(config.model.patch_size > 0)")
        return
    rows, columns = patches.check_patch_size(cfg["image_shape"], cfg["patch_size"])
    if kind not in ("learned", "sincos2d"):
        raise ValueError(f"config.model.position_embedding={kind!r}; image input "
                         f"(config.model.patch_size > 0) takes 'learned' or 'sincos2d'")
    if kind == "learned" and cfg["max_len"] < 1 + rows * columns:
        raise ValueError(f"config.model.max_len={cfg['max_len']} < 1 + {rows * columns} "
                         f"patches ([CLS] first) of config.model.image_shape="
                         f"{cfg['image_shape']} at patch_size={cfg['patch_size']}")
    others = set(cfg["heads"]) - set(IMAGE_HEADS)
    if others:
        raise ValueError(f"config.model.heads has {sorted(others)}, which read a "
                         f"vocabulary; image input (config.model.patch_size > 0) takes "
                         f"{IMAGE_HEADS}")
    if cfg["type_vocab_size"]:
        raise ValueError("config.model.type_vocab_size must be 0 with image input "
                         "(config.model.patch_size > 0): there are no segment types")
