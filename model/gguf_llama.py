"""A Llama-family GGUF file as strata parameters (`init_from=gguf:smollm2|gguf:<path>`).

`model_fields(hparams)` gives the `config.model` fields of the file's architecture;
`load(spec)` -> (flat {strata path: float32 array}, fields, path). llama.cpp's names map
onto the shared transformer's (model/transformer.py with the Llama options):

  token_embd              encoder/token_embed/embedding         [vocab, hidden]
  blk.i.attn_norm         encoder/block_i/attention_norm/scale
  blk.i.attn_q|k|v        encoder/block_i/attention/query|key|value/kernel
                          [hidden, heads, head_dim] (Q, K un-permuted to HF's layout)
  blk.i.attn_output       encoder/block_i/attention/out/kernel  [heads, head_dim, hidden]
  blk.i.ffn_norm          encoder/block_i/mlp_norm/scale
  blk.i.ffn_gate|up|down  encoder/block_i/mlp/gate|wi|wo/kernel
  output_norm             encoder/final_norm/scale
  output (untied only)    lm_head/kernel                        [hidden, vocab]
"""

import numpy as np

from model import gguf
from model.config import check_architecture


def model_fields(hparams):
    """The `config.model` fields that make the shared transformer this architecture."""
    return dict(
        vocab_size=hparams["vocab_size"], hidden=hparams["hidden"],
        num_layers=hparams["num_layers"], num_heads=hparams["num_heads"],
        num_kv_heads=hparams["num_kv_heads"], head_dim=hparams["head_dim"],
        mlp_dim=hparams["mlp_dim"], max_len=hparams["max_len"],
        layer_norm_eps=hparams["rms_eps"], rope_theta=hparams["rope_theta"],
        tie_embeddings=hparams["tied"], norm="pre", norm_type="rmsnorm",
        mlp_activation="swiglu", use_bias=False, position_embedding="rope",
        type_vocab_size=0, attention_mask="causal")


def strata_params(tensors, hparams):
    """llama.cpp tensors (dequantized, [out, in]) -> flat strata params."""
    tensors = gguf.unpermute_llama(tensors, hparams)
    hidden, head_dim = hparams["hidden"], hparams["head_dim"]
    heads = {"q": hparams["num_heads"], "k": hparams["num_kv_heads"],
             "v": hparams["num_kv_heads"]}
    flat = {"encoder/token_embed/embedding": tensors["token_embd.weight"],
            "encoder/final_norm/scale": tensors["output_norm.weight"]}
    if not hparams["tied"]:
        flat["lm_head/kernel"] = tensors["output.weight"].T
    for i in range(hparams["num_layers"]):
        blk, ours = f"blk.{i}.", f"encoder/block_{i}/"
        flat[ours + "attention_norm/scale"] = tensors[blk + "attn_norm.weight"]
        flat[ours + "mlp_norm/scale"] = tensors[blk + "ffn_norm.weight"]
        for short, name in (("q", "query"), ("k", "key"), ("v", "value")):
            weight = tensors[f"{blk}attn_{short}.weight"]  # [heads * head_dim, hidden]
            flat[f"{ours}attention/{name}/kernel"] = weight.T.reshape(
                hidden, heads[short], head_dim)
        flat[ours + "attention/out/kernel"] = tensors[blk + "attn_output.weight"].T.reshape(
            hparams["num_heads"], head_dim, hidden)
        for theirs, name in (("ffn_gate", "gate"), ("ffn_up", "wi"), ("ffn_down", "wo")):
            flat[f"{ours}mlp/{name}/kernel"] = tensors[f"{blk}{theirs}.weight"].T
    return {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}


def load(spec):
    """`gguf:smollm2` | `gguf:<path>` -> (flat strata params, model fields, file path)."""
    path = gguf.resolve_path(spec)
    metadata, tensors = gguf.read(path)
    hparams = gguf.llama_hparams(metadata)
    return strata_params(tensors, hparams), model_fields(hparams), path


def check_model_config(model_cfg, spec):
    """config.model must have the file's architecture: a ValueError naming each differing
    field with both values and the overrides that fix it."""
    fields = model_fields(gguf.llama_hparams(gguf.read_metadata(gguf.resolve_path(spec))))
    fields.pop("max_len")  # A shorter context than the file's is fine.
    check_architecture(model_cfg, fields, spec, "the file", "configs/decoder.py")
