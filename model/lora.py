"""LoRA (Hu et al. 2021): low-rank updates W + (alpha / r) A @ B on chosen projections.

`config.model.lora_rank` r > 0 adds, to every projection whose name re.fullmatch-es
`config.model.lora_targets` (from TARGETS), `lora_a` [*in, r] (Kaiming-uniform, as HF
PEFT) and `lora_b` [r, *out] (zeros: step 0 is exactly the base model). `merge_lora`
folds them into the kernels for inference with a `lora_rank=0` model.
"""

import dataclasses
import re

import jax.numpy as jnp

# Projections LoRA can target: attention (model/attention.py) and MLP (model/transformer.py).
TARGETS = ("query", "key", "value", "out", "wi", "wo", "gate")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What a `Linear` needs to add a LoRA update (hashable: a Linen module field)."""

    rank: int
    alpha: float
    dropout: float
    targets: str  # Regex over TARGETS names.

    @property
    def scale(self):
        return self.alpha / self.rank

    def for_projection(self, name):
        """This spec if the projection `name` is a target, else None (no LoRA)."""
        return self if re.fullmatch(self.targets, name) else None


def spec(cfg):
    """The model config's LoraSpec, or None when `lora_rank` is 0."""
    if not cfg.lora_rank:
        return None
    return LoraSpec(int(cfg.lora_rank), float(cfg.lora_alpha), float(cfg.lora_dropout),
                    cfg.lora_targets)


def check(cfg):
    """Fails early on a negative rank or targets that match no projection."""
    if cfg["lora_rank"] < 0:
        raise ValueError(f"config.model.lora_rank={cfg['lora_rank']}; expected >= 0 (0 = off)")
    if cfg["lora_rank"]:
        try:
            hits = [t for t in TARGETS if re.fullmatch(cfg["lora_targets"], t)]
        except re.error as e:
            raise ValueError(f"config.model.lora_targets={cfg['lora_targets']!r}: {e}") from e
        if not hits:
            raise ValueError(f"config.model.lora_targets={cfg['lora_targets']!r} matches none "
                             f"of {TARGETS}")
        attention = cfg["num_heads"] * cfg["head_dim"]
        kv_heads = cfg.get("num_kv_heads", -1)
        kv = (cfg["num_heads"] if kv_heads in (-1, None) else kv_heads) * cfg["head_dim"]
        sizes = {"query": (cfg["hidden"], attention), "key": (cfg["hidden"], kv),
                 "value": (cfg["hidden"], kv), "out": (attention, cfg["hidden"]),
                 "wi": (cfg["hidden"], cfg["mlp_dim"]), "wo": (cfg["mlp_dim"], cfg["hidden"]),
                 "gate": (cfg["hidden"], cfg["mlp_dim"])}
        for target in hits:  # A rank above min(in, out) is no longer low-rank.
            if cfg["lora_rank"] > min(sizes[target]):
                raise ValueError(
                    f"config.model.lora_rank={cfg['lora_rank']} exceeds the {target} "
                    f"projection's rank bound min{sizes[target]} = {min(sizes[target])}")


def merge_lora(params, model_cfg):
    """Folds every LoRA pair into its kernel: W += (alpha / r) * A @ B; drops lora_a/b.

    `params`: an unboxed params tree of a model with `lora_rank` r > 0. Returns the params
    of the same model with `lora_rank=0` (the input is not modified). A [*in, r] and
    B [r, *out] contract over r to [*in, *out], the kernel's shape.
    """
    scale = model_cfg.lora_alpha / model_cfg.lora_rank

    def merge(node):
        if not isinstance(node, dict):
            return node
        node = {k: merge(v) for k, v in node.items()}
        if "lora_a" in node:
            a, b = node.pop("lora_a"), node.pop("lora_b")
            kernel = node["kernel"]
            delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
            node["kernel"] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
        return node

    return merge(dict(params))
