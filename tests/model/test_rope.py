"""Rotary position embedding (model/attention.py `rotary`, config.model.position_embedding):
against the complex-number formula, and the property it exists for: a model without a
position table depends on positions only through their offsets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import model_config
from model import hf_bert
from model.attention import rotary
from model.transformer import Model, resolve


def test_rotary_matches_complex_rotation():
    """Channel pair (i, i + d/2) as the complex number x_i + j x_{i+d/2}, times
    exp(j * position * 10000^(-i / (d/2)))."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = rng.integers(0, 50, (2, 5))
    half = 4
    angles = positions[:, :, None, None] * 10_000.0 ** (-np.arange(half) / half)
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angles)
    want = np.concatenate([z.real, z.imag], axis=-1)
    got = np.asarray(rotary(jnp.asarray(x), jnp.asarray(positions)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def tiny(position_embedding, **overrides):
    """init_std 0.5: sharp attention, so that positions visibly matter."""
    cfg = resolve(model_config("tiny", vocab_size=50, max_len=32, heads=("lm",),
                               dropout=0.0, attention_dropout=0.0, init_std=0.5,
                               position_embedding=position_embedding, **overrides))
    model = Model(cfg)
    tokens = jnp.asarray(np.random.default_rng(1).integers(5, 50, (2, 10)))
    params = model.init(jax.random.key(0), tokens, heads=("lm",))["params"]
    return model, params, tokens


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
def test_rope_model_sees_only_position_offsets(mode):
    model, params, tokens = tiny("rope", attention_mask=mode)
    assert "position_embed" not in params["encoder"]
    logits = lambda start: model.apply(
        {"params": params}, tokens, positions=jnp.arange(10)[None].repeat(2, 0) + start,
        heads=("lm",))["lm"]
    np.testing.assert_allclose(logits(0), logits(13), rtol=1e-4, atol=1e-4)  # f32 angles.
    # The learned table is absolute: the same shift changes its outputs.
    model, params, tokens = tiny("learned", attention_mask=mode)
    shifted = model.apply({"params": params}, tokens, heads=("lm",),
                          positions=jnp.arange(10)[None].repeat(2, 0) + 13)["lm"]
    assert np.abs(shifted - model.apply({"params": params}, tokens, heads=("lm",))["lm"]
                  ).max() > 1e-3
    # Order still matters under RoPE: reversing the positions changes the outputs.
    model, params, tokens = tiny("rope", attention_mask=mode)
    reversed_ = model.apply({"params": params}, tokens, heads=("lm",),
                            positions=jnp.arange(10)[::-1][None].repeat(2, 0))["lm"]
    assert np.abs(reversed_ - logits(0)).max() > 1e-3


def test_unknown_kind_and_bert_export_are_refused():
    with pytest.raises(ValueError, match="config.model.position_embedding='alibi'"):
        resolve(model_config("tiny", position_embedding="alibi"))
    with pytest.raises(hf_bert.HfCheckpointError, match="position_embedding='rope'"):
        hf_bert.hf_config(model_config("tiny", position_embedding="rope", type_vocab_size=2))
