"""The one transformer every stage shares: embeddings, N blocks, and task heads.

Linen modules; the compiled steps call `Model.apply` on a params pytree. Every parameter
and main activation carries logical axis names (`embed`, `heads`, `mlp`, `vocab`, ...)
that `config.logical_axis_rules` maps onto the (data, fsdp, tensor) mesh.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from model import initializers
from model.attention import MultiHeadAttention, make_attention_mask

HEADS = ("classify", "mlm", "lm")
REMAT_POLICIES = {
    "none": None,
    "full": lambda: None,  # Save nothing: recompute the whole block.
    "dots_saveable": lambda: __import__("jax").checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": lambda: __import__(
        "jax"
    ).checkpoint_policies.dots_with_no_batch_dims_saveable,
}

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")


def layer_norm(cfg, name):
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
    def __call__(self, x):
        cfg = self.cfg
        h = dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "wi")(x)
        h = nn.gelu(h, approximate=False)
        h = nn.with_logical_constraint(
            h, ("activation_batch", "activation_length", "activation_mlp")
        )
        h = self.adapt_hidden(h)
        # No dropout on the [batch, seq, mlp] hidden (as BERT): it would draw 4x the random
        # bits of the residual dropout for no documented gain.
        return dense(cfg, x.shape[-1], ("mlp", "embed"), "wo")(h)

    def adapt_hidden(self, h):
        """Hook for methods that rescale MLP hidden activations (PEFT); identity here."""
        return h


class Block(nn.Module):
    """One transformer block; `cfg.norm` picks pre-LN or post-LN (original BERT)."""

    cfg: Any

    @nn.compact
    def __call__(self, x, mask, deterministic=True, decode=False):
        cfg = self.cfg
        attention = MultiHeadAttention(
            num_heads=cfg.num_heads, head_dim=cfg.head_dim, max_len=cfg.max_len,
            init=cfg.init, init_std=cfg.init_std, dropout_rate=cfg.attention_dropout,
            impl=cfg.attention_impl, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            name="attention",
        )
        mlp = Mlp(cfg, name="mlp")
        drop = nn.Dropout(cfg.dropout)
        if cfg.norm == "pre":
            h = attention(layer_norm(cfg, "attention_norm")(x), mask,
                          deterministic=deterministic, decode=decode)
            x = x + drop(h, deterministic=deterministic)
            h = mlp(layer_norm(cfg, "mlp_norm")(x))
            x = x + drop(h, deterministic=deterministic)
        else:
            h = attention(x, mask, deterministic=deterministic, decode=decode)
            x = layer_norm(cfg, "attention_norm")(x + drop(h, deterministic=deterministic))
            h = mlp(x)
            x = layer_norm(cfg, "mlp_norm")(x + drop(h, deterministic=deterministic))
        return nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)


class Encoder(nn.Module):
    """Embeddings and the block stack: tokens [batch, seq] -> hidden [batch, seq, embed]."""

    cfg: Any

    def setup(self):
        cfg = self.cfg
        self.token_embed = nn.Embed(
            cfg.vocab_size, cfg.hidden, embedding_init=initializers.embedding(
                cfg.init_std, ("vocab", "embed")),
            dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        )
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
        # Post-LN (BERT) normalises the embeddings; pre-LN normalises the final output.
        self.norm = layer_norm(cfg, "embed_norm" if cfg.norm == "post" else "final_norm")
        self.dropout = nn.Dropout(cfg.dropout)
        block = Block
        if cfg.remat != "none":
            if cfg.remat not in REMAT_POLICIES:
                raise ValueError(
                    f"config.model.remat={cfg.remat!r}; expected one of {list(REMAT_POLICIES)}")
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat](),
                             static_argnums=(3, 4))
        self.blocks = [block(cfg, name=f"block_{i}") for i in range(cfg.num_layers)]

    def __call__(self, tokens, *, segment_ids=None, positions=None, token_type_ids=None,
                 prefix_mask=None, attention_mask=None, deterministic=True, decode=False):
        """Args (all [batch, seq]): tokens; segment_ids (0 = padding, default: tokens != 0
        is not assumed, every token is real); positions (default 0..seq-1); token types;
        prefix_mask for prefix-LM. `attention_mask` [batch, 1, q, k] overrides the mask
        built from segment ids (the decoding loop passes the cache-wide mask).
        """
        cfg = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if attention_mask is None:
            attention_mask = make_attention_mask(segment_ids, cfg.attention_mask, prefix_mask)
        x = self.embed_tokens(tokens) + self.position_embed(positions)
        if cfg.type_vocab_size:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(tokens)
            x = x + self.type_embed(token_type_ids)
        x = nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)
        if cfg.norm == "post":
            x = self.norm(x)
        x = self.dropout(x, deterministic=deterministic)
        for block in self.blocks:
            x = block(x, attention_mask, deterministic, decode)
        if cfg.norm == "pre":
            x = self.norm(x)
        return x

    def embed_tokens(self, tokens):
        return self.token_embed(tokens)

    def attend(self, x):
        """Tied output projection: hidden [..., embed] -> logits [..., vocab]."""
        return self.token_embed.attend(x)


class ClassifyHead(nn.Module):
    """Sequence classification: pooled [CLS] (BERT pooler: dense + tanh) or mean."""

    cfg: Any

    @nn.compact
    def __call__(self, hidden, segment_ids, *, deterministic=True):
        cfg = self.cfg
        if cfg.pooling == "cls":
            pooled = hidden[:, 0]
        elif cfg.pooling == "mean":
            # Mean over the first sequence's tokens (segment 1); padding excluded.
            weights = (segment_ids == 1).astype(hidden.dtype)[..., None]
            pooled = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        else:
            raise ValueError(f"config.model.pooling={cfg.pooling!r}; expected 'cls' or 'mean'")
        pooled = jnp.tanh(dense(cfg, cfg.hidden, ("embed", "mlp"), "pooler")(pooled))
        pooled = nn.Dropout(cfg.dropout)(pooled, deterministic=deterministic)
        return dense(cfg, cfg.num_classes, ("mlp", "classes"), "classifier")(pooled)


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
    [batch, seq, vocab] (tied, no transform).
    """

    cfg: Any

    def setup(self):
        cfg = self.cfg
        unknown = set(cfg.heads) - set(HEADS)
        if unknown:
            raise ValueError(f"config.model.heads has {sorted(unknown)}; expected from {HEADS}")
        self.encoder = Encoder(cfg)
        if "classify" in cfg.heads:
            self.classify_head = ClassifyHead(cfg)
        if "mlm" in cfg.heads:
            self.mlm_head = MlmHead(cfg)

    def __call__(self, tokens, *, segment_ids=None, positions=None, token_type_ids=None,
                 prefix_mask=None, attention_mask=None, mlm_positions=None,
                 deterministic=True, decode=False, heads=None):
        hidden = self.encoder(
            tokens, segment_ids=segment_ids, positions=positions,
            token_type_ids=token_type_ids, prefix_mask=prefix_mask,
            attention_mask=attention_mask, deterministic=deterministic, decode=decode,
        )
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        outputs = {"hidden": hidden}
        for head in heads or self.cfg.heads:
            if head == "classify":
                outputs[head] = self.classify_head(hidden, segment_ids,
                                                   deterministic=deterministic)
            elif head == "mlm":
                selected = hidden
                if mlm_positions is not None:
                    selected = jnp.take_along_axis(hidden, mlm_positions[..., None], axis=1)
                outputs[head] = self.mlm_head(selected, self.encoder.attend)
            elif head == "lm":
                outputs[head] = self.encoder.attend(hidden)
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
    cfg["dtype"] = jnp.dtype(cfg["dtype"])
    cfg["param_dtype"] = jnp.dtype(cfg["param_dtype"])
    cfg["heads"] = tuple(cfg["heads"])
    fields = sorted(cfg)
    frozen = dataclasses.make_dataclass("ModelConfig", fields, frozen=True)
    return frozen(**cfg)
