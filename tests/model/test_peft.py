"""Parameter-efficient fine-tuning on a tiny model: LoRA, (IA)^3 and adapters start
exactly at the base model, only the new parameters (and the head) train, gradients reach
them, LoRA merges back into plain kernels, prompt tuning keeps the heads' positions, and
prefixes are seen by every query. (Decoding with them: tests/model/test_attention.py.)"""

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import finetune
from configs.common import model_config
from model.lora import merge_lora
from model.prefix import fold_prefix_mlp
from model.transformer import Model, resolve
from train import param_rules
from train.optimizer import weight_decay_mask

SEQ, VOCAB, CLASSES = 12, 97, 5
HIDDEN, MLP, LAYERS = 64, 128, 2  # model_config("tiny").
METHOD_FIELDS = {
    "lora": dict(lora_rank=4, lora_alpha=8.0, lora_targets="query|key|value|out|wi|wo"),
    "ia3": dict(ia3=True),
    "prompt_tuning": dict(prompt_length=5),
    "prefix_tuning": dict(prefix_length=3),
    "adapters": dict(adapter_dim=8),
}
# The new parameters' sizes for METHOD_FIELDS: LoRA adds r * (in + out) per projection.
NEW_PARAMS = {
    "lora": LAYERS * (4 * 4 * (HIDDEN + HIDDEN) + 2 * 4 * (HIDDEN + MLP)),
    "ia3": LAYERS * (HIDDEN + HIDDEN + MLP),
    "prompt_tuning": 5 * HIDDEN,
    "prefix_tuning": LAYERS * 2 * 3 * HIDDEN,  # Keys and values [3, heads, head_dim].
    "adapters": LAYERS * 2 * (HIDDEN * 8 + 8 + 8 * HIDDEN + HIDDEN),  # down, up: 2 a block.
}
# Row 0 full, row 1 padded, row 2 two packed sequences then padding.
SEGMENTS = np.array([[1] * SEQ, [1] * 8 + [0] * 4, [1] * 5 + [2] * 5 + [0] * 2])


def model_cfg(**fields):
    return model_config("tiny", vocab_size=VOCAB, max_len=SEQ, num_classes=CLASSES,
                        dropout=0.0, attention_dropout=0.0, **fields)


def init(cfg):
    tokens = jnp.zeros((1, SEQ), jnp.int32)
    return nn.unbox(Model(resolve(cfg)).init(jax.random.key(0), tokens)["params"])


def forward(cfg, params, **kwargs):
    # Op by op, not jitted: the tiny ops compile once for the whole file, while every
    # config here would compile its own jitted graph.
    tokens = np.random.default_rng(0).integers(1, VOCAB, SEGMENTS.shape)
    return Model(resolve(cfg)).apply({"params": params}, jnp.asarray(tokens),
                                     segment_ids=jnp.asarray(SEGMENTS), **kwargs)


def flat(tree):
    return dict(zip(param_rules.param_paths(tree), jax.tree_util.tree_leaves(tree)))


def without(params, pattern, prefix=""):
    """`params` less the leaves whose path re.fullmatch-es `pattern`."""
    out = {}
    for key, value in params.items():
        path = prefix + key
        if isinstance(value, dict):
            kept = without(value, pattern, path + "/")
            if kept:
                out[key] = kept
        elif not re.fullmatch(pattern, path):
            out[key] = value
    return out


def replace_leaves(params, pattern, fn):
    """`params` with fn(path, leaf) at the leaves whose path matches `pattern`."""
    def visit(path, leaf):
        path = param_rules.path_string(path)
        return fn(path, leaf) if re.fullmatch(pattern, path) else leaf
    return jax.tree_util.tree_map_with_path(visit, params)


def random_like(path, leaf):
    key = jax.random.key(zlib.crc32(path.encode()))
    return 0.1 * jax.random.normal(key, leaf.shape, leaf.dtype)


def test_lora_ia3_and_adapters_start_exactly_at_the_base_model():
    """All three at once (one forward pass): each adds an exactly-zero update at init."""
    methods = ("lora", "ia3", "adapters")
    cfg = model_cfg(**{k: v for m in methods for k, v in METHOD_FIELDS[m].items()})
    params = init(cfg)
    base = without(params, "|".join(finetune.PEFT_PARAMS[m] for m in methods))
    assert set(flat(base)) == set(flat(init(model_cfg())))  # Only new leaves were added.
    got, want = forward(cfg, params), forward(model_cfg(), base)
    for name in ("hidden", "classify"):
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)


def test_lora_shapes_and_merge_equals_the_adapted_model():
    cfg = model_cfg(**METHOD_FIELDS["lora"])
    params = init(cfg)
    shapes = {p: x.shape for p, x in flat(params).items()}
    block = "encoder/block_0/"
    assert shapes[block + "attention/query/lora_a"] == (HIDDEN, 4)
    assert shapes[block + "attention/query/lora_b"] == (4, 4, HIDDEN // 4)  # [r, heads, kv]
    assert shapes[block + "attention/out/lora_a"] == (4, HIDDEN // 4, 4)
    assert shapes[block + "mlp/wi/lora_b"] == (4, MLP)
    assert shapes[block + "mlp/wi/kernel"] == (HIDDEN, MLP)  # Path unchanged from nn.Dense.
    np.testing.assert_array_equal(params["encoder"]["block_0"]["mlp"]["wo"]["lora_b"], 0.0)

    trained = replace_leaves(params, r".*/lora_b", random_like)  # A non-zero update.
    merged = merge_lora(trained, cfg)
    assert not [p for p in flat(merged) if "lora" in p]
    got, want = forward(cfg, trained), forward(model_cfg(), merged)
    before = forward(model_cfg(), without(trained, finetune.PEFT_PARAMS["lora"]))
    assert not np.allclose(got["hidden"], before["hidden"], atol=1e-3)  # It matters...
    for name in ("hidden", "classify"):  # ...and merging reproduces it.
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("method", list(METHOD_FIELDS))
def test_only_the_new_params_and_head_train(method):
    cfg = model_cfg(**METHOD_FIELDS[method])
    params = jax.eval_shape(lambda: init(cfg))  # Shapes suffice.
    rules = finetune.get_config(f"method={method},size=tiny").optim.param_rules
    mask = flat(param_rules.trainable_mask(params, rules))
    new = {p for p in mask if re.fullmatch(finetune.PEFT_PARAMS[method], p)}
    head = {p for p in mask if p.startswith("classify_head/")}
    # Houlsby et al. train every LayerNorm alongside the adapters.
    norms = {p for p in mask if re.fullmatch(finetune.NORMS, p)} if method == "adapters" \
        else set()
    assert new and {p for p, trains in mask.items() if trains} == new | head | norms
    sizes = flat(params)
    assert sum(sizes[p].size for p in new) == NEW_PARAMS[method]


def test_gradients_reach_the_new_params():
    """Every method at once (one backward pass), through the train path (dropout on)."""
    fields = {k: v for m in METHOD_FIELDS.values() for k, v in m.items()}
    cfg = model_cfg(**fields, lora_dropout=0.1)
    params = init(cfg)
    labels = jnp.arange(len(SEGMENTS)) % CLASSES

    def loss(params):
        logits = forward(cfg, params, deterministic=False,
                         rngs={"dropout": jax.random.key(1)})["classify"]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()

    # Jitted: one compile of the whole backward pass (op by op, its many small transposed
    # ops each compile on their own: ~40 s).
    grads = flat(jax.jit(jax.grad(loss))(params))
    # LoRA's A (an adapter's down) gets no gradient while B (up) is zero at step 0; B
    # does, and then A will.
    # (P-tuning replaces prompt tuning's vectors: its own test below.)
    patterns = dict({m: finetune.PEFT_PARAMS[m] for m in METHOD_FIELDS}, lora=r".*/lora_b",
                    adapters=r".*_adapter/up/.*")
    for method, pattern in patterns.items():
        new = [p for p in grads if re.fullmatch(pattern, p)]
        assert new, method
        for path in new:
            assert np.abs(grads[path]).max() > 0, path


def test_prompt_reaches_its_sequence_and_heads_keep_their_positions():
    cfg = model_cfg(**METHOD_FIELDS["prompt_tuning"])
    params = init(cfg)
    out = forward(cfg, params)
    assert out["hidden"].shape == (len(SEGMENTS), SEQ, HIDDEN)
    moved = forward(cfg, replace_leaves(params, "encoder/prompt", random_like))
    changed = np.abs(np.asarray(moved["hidden"] - out["hidden"])).max(-1) > 1e-5
    # Prompts share the first sequence's segment: they reach it, not the packed second one.
    np.testing.assert_array_equal(changed[2, :5], True)
    np.testing.assert_array_equal(changed[2, 5:10], False)
    assert changed[0].all() and changed[1, :8].all()
    # Position 0 (what [CLS] pooling reads) is the first real token, not a prompt: with a
    # causal mask it sees only itself, so it equals the base model's position 0.
    causal = dict(attention_mask="causal")
    got = forward(model_cfg(**METHOD_FIELDS["prompt_tuning"], **causal), params)["hidden"]
    want = forward(model_cfg(**causal), without(params, "encoder/prompt"))["hidden"]
    np.testing.assert_allclose(got[:, 0], want[:, 0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(got[0, 1:], want[0, 1:], atol=1e-3)  # Later tokens see prompts.


def test_bad_lora_targets_are_refused():
    with pytest.raises(ValueError, match="config.model.lora_targets"):
        resolve(model_cfg(lora_rank=4, lora_targets="queries"))
    with pytest.raises(ValueError, match=r"lora_rank=65 exceeds the query projection"):
        resolve(model_cfg(lora_rank=65, lora_targets="query"))  # hidden = 64.
    resolve(model_cfg(lora_rank=64, lora_targets="query"))  # Full rank is allowed.


def test_prefix_is_seen_by_every_query():
    cfg = model_cfg(**METHOD_FIELDS["prefix_tuning"])
    params = init(cfg)
    out = forward(cfg, params)
    assert out["hidden"].shape == (len(SEGMENTS), SEQ, HIDDEN)
    moved = forward(cfg, replace_leaves(params, r".*/prefix_(key|value)", random_like))
    changed = np.abs(np.asarray(moved["hidden"] - out["hidden"])).max(-1) > 1e-5
    assert changed.all()  # Every position of every sequence, packed or padded.


def test_ia3_scales_are_not_weight_decayed():
    decays = flat(weight_decay_mask(init(model_cfg(ia3=True))))
    assert not decays["encoder/block_0/attention/ia3_key"]  # [heads, head_dim], yet a scale.
    assert decays["encoder/block_0/attention/query/kernel"]


def test_prefix_mlp_folds_into_plain_prefixes():
    """Li & Liang's reparameterisation: the MLP makes every layer's prefixes; folded, a
    model without the MLP gives the same outputs with the plain prefix count."""
    cfg = model_cfg(prefix_length=3, prefix_mlp_dim=16)
    params = replace_leaves(init(cfg), r"encoder/prefix_mlp/.*", random_like)
    assert "prefix_key" not in params["encoder"]["block_0"]["attention"]
    folded, folded_cfg = fold_prefix_mlp(params, resolve(cfg))
    assert folded_cfg.prefix_mlp_dim == 0 and "prefix_mlp" not in folded["encoder"]
    assert sum(x.size for x in jax.tree_util.tree_leaves(without(
        folded, r"(?!.*prefix_(key|value)).*"))) == NEW_PARAMS["prefix_tuning"]
    # The MLP's output layer reaches every layer's prefixes (it is not a no-op).
    assert_folded_matches(cfg, params, folded, model_cfg(prefix_length=3),
                          r"encoder/prefix_mlp/output/kernel")


def assert_folded_matches(cfg, params, folded, plain, output_kernel):
    """`folded` has the plain config's structure and gives `cfg`'s outputs, and doubling
    the reparameterisation's `output_kernel` changes them (it is not a no-op)."""
    assert jax.tree_util.tree_structure(folded) == jax.tree_util.tree_structure(init(plain))
    want, got = forward(cfg, params), forward(plain, folded)
    for name in ("hidden", "classify"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    moved = forward(cfg, replace_leaves(params, output_kernel, lambda p, x: 2 * x))
    assert not np.allclose(moved["hidden"], want["hidden"], atol=1e-4)


def test_p_tuning_prompt_encoder_trains_alone_and_folds_into_plain_prompts():
    """P-tuning (Liu et al. 2021): the prompt vectors come from a trainable MLP over free
    inputs; only it (and the head) trains, and folded into prompt tuning's plain vectors
    the model gives the same outputs with no encoder."""
    from model.prefix import fold_prompt_encoder

    cfg = model_cfg(prompt_length=5, prompt_encoder_dim=16)
    params = replace_leaves(init(cfg), r"encoder/prompt_encoder/.*", random_like)
    encoder = flat(params["encoder"]["prompt_encoder"])
    assert sum(x.size for x in encoder.values()) == 5 * HIDDEN + (HIDDEN * 16 + 16) + (
        16 * HIDDEN + HIDDEN)  # Inputs, hidden layer, output layer.
    rules = finetune.get_config("method=p_tuning,size=tiny").optim.param_rules
    mask = flat(param_rules.trainable_mask(params, rules))
    assert {p for p, trains in mask.items() if trains} == {
        p for p in mask if p.startswith(("encoder/prompt_encoder/", "classify_head/"))}
    folded, folded_cfg = fold_prompt_encoder(params, resolve(cfg))
    assert folded_cfg.prompt_encoder_dim == 0 and "prompt_encoder" not in folded["encoder"]
    # The encoder's output layer reaches the prompts (it is not a no-op).
    assert_folded_matches(cfg, params, folded, model_cfg(prompt_length=5),
                          r"encoder/prompt_encoder/output/kernel")
