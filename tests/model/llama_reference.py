"""An independent numpy forward pass of the Llama architecture (HF `modeling_llama`
semantics), written apart from `model/` to check it: no strata model code is imported.

`weights` are llama.cpp-named float32 arrays in HF layout (Linear weights [out, in]) with
the query/key rows already un-permuted (`model.gguf.read` then `model.gguf.unpermute_llama`);
`hparams` is `model.gguf.llama_hparams`'s dict.

  h = embed[tokens]
  per block: h += o(attention(rms_norm(h) * attn_norm)); h += mlp(rms_norm(h) * ffn_norm)
  logits = rms_norm(h) * output_norm @ (output or embed).T

Attention: RoPE on queries and keys (HF's layout: each head's first half pairs with its
second half), grouped-query heads (query head h reads key/value head h // group), causal
softmax of q.k / sqrt(head_dim). MLP: down(silu(gate(x)) * up(x)).
"""

import contextlib
import ctypes

import numpy as np


@contextlib.contextmanager
def blas_threads(n):
    """Best effort: numpy's OpenBLAS on `n` threads inside the block. On a shared 2-core
    machine, OpenBLAS's default (a thread per core, spinning) made the greedy test 8x
    slower (13.5 s vs 1.6 s); without threadpoolctl this finds numpy's bundled library."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
        return
    get = set_ = None
    with open("/proc/self/maps") as maps:
        libraries = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    for library in sorted(libraries):
        lib = ctypes.CDLL(library)
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                break
        if set_ is not None:
            break
    if set_ is None:
        yield
        return
    before = get()
    set_(n)
    try:
        yield
    finally:
        set_(before)


def rms_norm(x, scale, eps):
    """x [..., d] * rsqrt(mean(x^2) + eps) * scale."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope_tables(seq, head_dim, theta):
    """cos, sin [seq, head_dim]: angle(p, i) = p * theta^(-2i/d), both halves repeated."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(seq, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
    """x [heads, seq, head_dim] rotated by position."""
    return x * cos[None] + rotate_half(x) * sin[None]


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def attention(x, w, prefix, hp, cos, sin):
    """x [seq, hidden] (normed) -> [seq, hidden]."""
    seq, d = x.shape[0], hp["head_dim"]
    heads, kv_heads = hp["num_heads"], hp["num_kv_heads"]
    q = (x @ w[prefix + "attn_q.weight"].T).reshape(seq, heads, d).transpose(1, 0, 2)
    k = (x @ w[prefix + "attn_k.weight"].T).reshape(seq, kv_heads, d).transpose(1, 0, 2)
    v = (x @ w[prefix + "attn_v.weight"].T).reshape(seq, kv_heads, d).transpose(1, 0, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    group = heads // kv_heads
    k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)  # [heads, seq, d]
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(np.float32(d))  # [heads, seq_q, seq_k]
    causal = np.tril(np.ones((seq, seq), bool))
    scores = np.where(causal[None], scores, np.float32(-np.inf))
    out = softmax(scores) @ v  # [heads, seq, d]
    out = out.transpose(1, 0, 2).reshape(seq, heads * d)
    return out @ w[prefix + "attn_output.weight"].T


def mlp(x, w, prefix):
    gate = x @ w[prefix + "ffn_gate.weight"].T
    up = x @ w[prefix + "ffn_up.weight"].T
    return (silu(gate) * up) @ w[prefix + "ffn_down.weight"].T


def llama_hidden(weights, hparams, token_ids):
    """token_ids [seq] -> final-normed hidden states [seq, hidden] (float32)."""
    hp, w = hparams, weights
    ids = np.asarray(token_ids, np.int64)
    h = w["token_embd.weight"][ids].astype(np.float32)
    cos, sin = rope_tables(len(ids), hp["head_dim"], hp["rope_theta"])
    eps = np.float32(hp["rms_eps"])
    for i in range(hp["num_layers"]):
        prefix = f"blk.{i}."
        h = h + attention(rms_norm(h, w[prefix + "attn_norm.weight"], eps), w, prefix, hp,
                          cos, sin)
        h = h + mlp(rms_norm(h, w[prefix + "ffn_norm.weight"], eps), w, prefix)
    return rms_norm(h, w["output_norm.weight"], eps)


def output_embedding(weights):
    """[vocab, hidden]: output.weight, or the token embedding when tied."""
    return weights.get("output.weight", weights["token_embd.weight"])


def llama_logits(weights, hparams, token_ids):
    """token_ids [seq] -> logits [seq, vocab] (float32)."""
    return llama_hidden(weights, hparams, token_ids) @ output_embedding(weights).T


def greedy(weights, hparams, prompt_ids, n, stop_id=None):
    """Greedy decoding by full recomputation: -> the (up to) `n` new ids, ending early
    after `stop_id`."""
    ids, new = list(prompt_ids), []
    out = output_embedding(weights)
    for _ in range(n):
        last = llama_hidden(weights, hparams, ids)[-1]
        token = int(np.argmax(out @ last))
        ids.append(token)
        new.append(token)
        if token == stop_id:
            break
    return new
