"""Drop the reparameterisations of prefix tuning (its MLP) and P-tuning (its prompt
encoder) after training.

With `cfg.prefix_mlp_dim > 0` every layer's prefixes are computed by `PrefixMlp` from
free vectors. The MLP only helps optimisation; once trained, its outputs are all that
matter, so they are stored as each layer's plain `prefix_key` / `prefix_value` and the
model runs with `prefix_mlp_dim=0`: same outputs, fewer parameters, no MLP at inference.
"""

import dataclasses

from model.transformer import PrefixMlp, PromptEncoder


def fold_prefix_mlp(params, cfg):
    """-> (params, cfg) with the MLP's prefixes stored per layer and the MLP removed.

    `params`: the model's params tree (`{"encoder": {"prefix_mlp": ..., "block_i": ...}}`);
    `cfg`: its resolved model config. A model without the MLP comes back unchanged.
    """
    if not (cfg.prefix_length and cfg.prefix_mlp_dim):
        return params, cfg
    encoder = dict(params["encoder"])
    prefixes = PrefixMlp(cfg).apply({"params": encoder.pop("prefix_mlp")})
    for i, (keys, values) in enumerate(prefixes):
        block = dict(encoder[f"block_{i}"])
        block["attention"] = {**block["attention"], "prefix_key": keys,
                              "prefix_value": values}
        encoder[f"block_{i}"] = block
    return {**params, "encoder": encoder}, dataclasses.replace(cfg, prefix_mlp_dim=0)


def fold_prompt_encoder(params, cfg):
    """-> (params, cfg) with P-tuning's prompt encoder output stored as the plain prompt
    vectors (`encoder/prompt`, prompt tuning's) and the encoder removed: same outputs.
    A model without the encoder comes back unchanged."""
    if not (cfg.prompt_length and cfg.prompt_encoder_dim):
        return params, cfg
    encoder = dict(params["encoder"])
    encoder["prompt"] = PromptEncoder(cfg).apply({"params": encoder.pop("prompt_encoder")})
    return {**params, "encoder": encoder}, dataclasses.replace(cfg, prompt_encoder_dim=0)
