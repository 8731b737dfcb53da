"""Image input of the shared transformer: patches against explicit numpy slicing, the
2-D sin-cos table against its formula, SimMIM's masking, and the bad-input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import model_config
from model import patches
from model.transformer import Model, resolve


def reference_patches(images, p):
    """Patch k = image[r*p:(r+1)*p, c*p:(c+1)*p, :] flattened, k = r * columns + c."""
    b, h, w, c = images.shape
    out = np.zeros((b, (h // p) * (w // p), p * p * c), images.dtype)
    for r in range(h // p):
        for col in range(w // p):
            out[:, r * (w // p) + col] = images[:, r * p:(r + 1) * p,
                                                col * p:(col + 1) * p].reshape(b, -1)
    return out


@pytest.mark.parametrize("shape, p", [((2, 8, 8, 1), 2), ((3, 6, 4, 3), 2), ((1, 8, 8, 1), 4)])
def test_patchify_matches_slicing_and_unpatchify_inverts(shape, p):
    images = np.random.default_rng(0).random(shape).astype(np.float32)
    got = patches.patchify(images, p)
    np.testing.assert_array_equal(got, reference_patches(images, p))
    np.testing.assert_array_equal(patches.unpatchify(got, shape[1:], p), images)
    np.testing.assert_array_equal(np.asarray(patches.patchify(jnp.asarray(images), p)), got)


def test_sincos_2d_follows_its_formula():
    table = patches.sincos_2d(3, 4, 8)  # 2 rows' dims + 2 columns' dims per sin/cos.
    for r in range(3):
        for c in range(4):
            k = r * 4 + c
            for pos, half in ((r, table[k, :4]), (c, table[k, 4:])):
                omega = 1 / 10000 ** (np.arange(2) / 2)
                np.testing.assert_allclose(
                    half, np.concatenate([np.sin(pos * omega), np.cos(pos * omega)]), atol=1e-6)


def image_model(**fields):
    cfg = model_config("tiny", patch_size=2, image_shape=(8, 8, 1), max_len=17,
                       num_classes=10, dropout=0.0, attention_dropout=0.0, norm="pre",
                       heads=("classify", "pixels"))
    cfg.update(fields)
    model = Model(resolve(cfg))
    params = jax.jit(model.init)({"params": jax.random.key(0)},
                                 jnp.zeros((1, 17), jnp.int32))["params"]
    return model, params


@pytest.fixture(scope="module")
def model_and_params():
    return image_model()


def test_masked_patches_do_not_reach_the_output(model_and_params):
    """SimMIM: a masked patch's pixels are replaced by the mask vector, so changing them
    changes nothing; changing a visible patch does."""
    model, params = model_and_params
    images = np.random.default_rng(1).random((2, 8, 8, 1)).astype(np.float32)
    masked = jnp.array([[1, 6], [2, 16]])  # Sequence indices: patch k is at k + 1.

    run = jax.jit(lambda x: model.apply({"params": params}, x, mlm_positions=masked))

    base = run(images)
    changed = images.copy()
    changed[0, 0:2, 0:2] += 1.0  # Patch 0 of row 0 (masked: index 1).
    changed[1, 6:8, 6:8] += 1.0  # Patch 15 of row 1 (masked: index 16).
    np.testing.assert_allclose(run(changed)["hidden"], base["hidden"], atol=1e-6)
    visible = images.copy()
    visible[0, 0:2, 2:4] += 1.0  # Patch 1 of row 0: visible.
    assert np.abs(np.asarray(run(visible)["classify"][0] - base["classify"][0])).max() > 1e-4
    assert base["pixels"].shape == (2, 2, 4)


def test_gradient_with_respect_to_pixels(model_and_params):
    """Pixels are a float input: attributions (integrated gradients) can differentiate."""
    model, params = model_and_params
    images = jnp.asarray(np.random.default_rng(2).random((1, 8, 8, 1)), jnp.float32)
    f = jax.jit(lambda x: model.apply({"params": params}, x,
                                      heads=("classify",))["classify"][0, 3])
    grad = jax.jit(jax.grad(f))(images)
    eps = 1e-2
    bumped = images.at[0, 3, 4, 0].add(eps)
    np.testing.assert_allclose(grad[0, 3, 4, 0], (f(bumped) - f(images)) / eps, rtol=0.05,
                               atol=1e-4)


def test_sincos_positions_have_no_table():
    model = Model(resolve(model_config(
        "tiny", patch_size=2, image_shape=(8, 8, 1), max_len=17,
        position_embedding="sincos2d", heads=("classify",))))
    params = jax.eval_shape(model.init, {"params": jax.random.key(0)},
                            jnp.zeros((1, 17), jnp.int32))["params"]
    assert "position_embed" not in params["encoder"]
    assert "mask" not in params["encoder"]["patch_embed"]  # Only with the pixels head.


@pytest.mark.parametrize("fields, message", [
    (dict(patch_size=3), "config.model.patch_size=3 does not divide"),
    (dict(image_shape=(8, 8)), "config.model.image_shape"),
    (dict(heads=("mlm",)), "image input"),
    (dict(position_embedding="rope"), "config.model.position_embedding='rope'"),
    (dict(max_len=8), "config.model.max_len=8"),
    (dict(patch_size=0), "needs image input"),
])
def test_bad_image_fields_name_the_key(fields, message):
    cfg = model_config("tiny", patch_size=2, image_shape=(8, 8, 1), max_len=17,
                       heads=("classify", "pixels"))
    cfg.update(fields)
    with pytest.raises(ValueError, match=message):
        resolve(cfg)


def test_wrong_image_shape_at_call(model_and_params):
    model, params = model_and_params
    with pytest.raises(ValueError, match=r"config.model.image_shape=\(8, 8, 1\)"):
        model.apply({"params": params}, jnp.zeros((1, 6, 8, 1)))
