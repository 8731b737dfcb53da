"""Drop prefix tuning's MLP reparameterisation after training.

With `cfg.prefix_mlp_dim > 0` every layer's prefixes are computed by `PrefixMlp` from
free vectors. The MLP only helps optimisation; once trained, its outputs are all that
matter, so they are stored as each layer's plain `prefix_key` / `prefix_value` and the
model runs with `prefix_mlp_dim=0`: same outputs, fewer parameters, no MLP at inference.
"""

import dataclasses

from model.transformer import PrefixMlp


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
