"""Sentence embeddings from the encoder: mean of the final hidden states over the real
tokens, L2-normalised (sentence-transformers' all-MiniLM-L6-v2 recipe).

`embed_texts` is what `launch.embed`, the benchmark and retrieval's corpus encoding call;
`load_encoder` turns an `init_from`-style spec (`hf:minilm`, `hf:<dir>`, a strata workdir)
into (params, model, tokenizer, max_len).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from model import config as model_config
from model import hf_bert
from model.transformer import Model, resolve

# Padded lengths a batch may take: few shapes, so few compilations, and little padding.
LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def mean_pool(hidden, mask):
    """hidden [batch, seq, embed], mask [batch, seq] (1 = real token) -> unit vectors
    [batch, embed]; an all-padding row gives zeros, not NaN."""
    weights = mask.astype(hidden.dtype)[..., None]
    pooled = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
    # As torch.nn.functional.normalize: divide by max(norm, eps).
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def make_encode_fn(model):
    """-> jitted (params, tokens [b, L], mask [b, L]) -> unit vectors [b, embed] float32.

    Only the encoder runs (no head), so params need only the `encoder` subtree.
    """
    def encode(params, tokens, mask):
        hidden = model.apply({"params": params}, tokens, segment_ids=mask,
                             method=lambda m, t, **kw: m.encoder(t, **kw))
        return mean_pool(hidden.astype(jnp.float32), mask)

    return jax.jit(encode)


def bucket_length(length, max_len):
    return min(next((b for b in LENGTH_BUCKETS if b >= length), max_len), max_len)


def tokenize(tokenizer, texts, max_len):
    """Texts -> `[CLS] pieces[:max_len - 2] [SEP]` id lists (the checkpoint's truncation)."""
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    return [[cls, *ids[: max_len - 2], sep] for ids in tokenizer.encode_batch(list(texts))]


def embed_texts(params, model, tokenizer, texts, batch_size=64, max_len=256,
                encode_fn=None, progress: Callable[[int, float], None] | None = None):
    """texts (n strings) -> float32 [n, embed], each row L2-normalised.

    Texts are sorted by length and batched, each batch padded to the next of
    LENGTH_BUCKETS (and to `batch_size` rows), so a corpus compiles at most
    len(LENGTH_BUCKETS) shapes and pads little. `progress(done, elapsed_s)` is called
    after each batch. Rows come back in the input order.
    """
    texts = list(texts)
    if not texts:
        return np.zeros((0, model.cfg.hidden), np.float32)
    encode_fn = encode_fn or make_encode_fn(model)
    start = time.perf_counter()
    out = np.zeros((len(texts), model.cfg.hidden), np.float32)
    rows = tokenize(tokenizer, texts, max_len)
    order = np.argsort([len(r) for r in rows], kind="stable")
    pending = None  # Dispatch batch i+1 before reading batch i: the host tokenises ahead.
    for begin in range(0, len(order), batch_size):
        index = order[begin:begin + batch_size]
        length = bucket_length(max(len(rows[i]) for i in index), max_len)
        tokens = np.full((batch_size, length), tokenizer.pad_id, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for j, i in enumerate(index):
            tokens[j, :len(rows[i])] = rows[i]
            mask[j, :len(rows[i])] = 1
        vectors = encode_fn(params, tokens, mask)
        if pending is not None:
            out[pending[0]] = np.asarray(pending[1])[:len(pending[0])]
        pending = (index, vectors)
        if progress:
            progress(min(begin + batch_size, len(order)), time.perf_counter() - start)
    out[pending[0]] = np.asarray(pending[1])[:len(pending[0])]
    return out


def hf_model_config(fields):
    """Model fields from `hf_bert.model_fields` (the shape included) -> a full
    `config.model` ConfigDict for encoding only (no head)."""
    return ml_collections.ConfigDict(dict(model_config.DEFAULTS, **fields, heads=()))


def load_encoder(spec):
    """`hf:minilm` | `hf:<dir>` | strata workdir -> (params, model, tokenizer, max_len).

    max_len: the checkpoint's embedding truncation (256 for all-MiniLM-L6-v2), a strata
    run's `data.seq_len`.
    """
    from train.data import tokenizer as tokenizers

    if spec.startswith("hf:"):
        directory = hf_bert.resolve_dir(spec)
        flat, fields, _ = hf_bert.load(directory)
        model = Model(resolve(hf_model_config(fields)))
        params = unflatten({k: v for k, v in flat.items() if k.startswith("encoder/")})
        tok = tokenizers.WordPieceTokenizer(os.path.join(directory, hf_bert.VOCAB))
        return params, model, tok, min(hf_bert.max_seq_length(directory), fields["max_len"])
    from train.init_from import load_params

    config_path = os.path.join(spec, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{spec!r} is neither hf:<alias|dir> nor a strata workdir (no config.json)")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    flat, _ = load_params(spec)
    config.model.heads = ()
    model = Model(resolve(config.model))
    params = unflatten({k: v for k, v in flat.items() if k.startswith("encoder/")})
    return params, model, tokenizers.get_tokenizer(config.data), config.data.seq_len


def unflatten(flat):
    """{"a/b/c": array} -> nested dicts {"a": {"b": {"c": array}}}."""
    tree = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree
