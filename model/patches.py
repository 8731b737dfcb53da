"""Images as sequences of patches (ViT): patchify, unpatchify, 2-D sin-cos positions.

An image [batch, height, width, channels] is cut into non-overlapping p x p patches in
row-major order (left to right, then top to bottom); each patch is flattened as
(row, column, channel), so patch k of an image holds `image[r*p:(r+1)*p, c*p:(c+1)*p, :]`
with k = r * (width // p) + c. Works on numpy and jax arrays alike (reshapes only).
"""

import numpy as np


def check_patch_size(image_shape, patch_size) -> tuple[int, int]:
    """-> the patch grid (rows, columns); a ValueError naming the keys when `patch_size`
    does not tile the `image_shape` (height, width, channels)."""
    if len(tuple(image_shape)) != 3 or min(image_shape) < 1:
        raise ValueError(f"config.model.image_shape={tuple(image_shape)!r}; expected "
                         f"(height, width, channels), each >= 1")
    height, width, _ = image_shape
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(
            f"config.model.patch_size={patch_size} does not divide the image: "
            f"config.model.image_shape={tuple(image_shape)!r} needs a patch size dividing "
            f"both height {height} and width {width} (non-overlapping patches)")
    return height // patch_size, width // patch_size


def patchify(images, patch_size):
    """[batch, H, W, C] -> [batch, (H/p) * (W/p), p * p * C] (row-major patches)."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [b, rows, cols, p, p, c]
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches, image_shape, patch_size):
    """`patchify`'s inverse: [batch, N, p * p * C] -> [batch, H, W, C]."""
    h, w, c = image_shape
    p = patch_size
    b = patches.shape[0]
    x = patches.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def sincos_1d(dim, positions):
    """float32 [len(positions), dim]: sin on the first half, cos on the second
    (Vaswani et al.'s frequencies 1 / 10000^(2i/dim))."""
    if dim % 2:
        raise ValueError(f"a sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angles = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def sincos_2d(rows, columns, dim):
    """float32 [rows * columns, dim], MAE's fixed 2-D positions: the first half of the
    width encodes the patch's row, the second its column (`dim` divisible by 4)."""
    if dim % 4:
        raise ValueError(f"config.model.position_embedding='sincos2d' needs "
                         f"config.model.hidden divisible by 4, got {dim}")
    row, column = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, row), sincos_1d(dim // 2, column)], axis=1)


def normalised_patches(images, patch_size, eps=1e-6):
    """MAE's reconstruction target: each patch's pixels minus their mean, over their
    standard deviation (sqrt(var + eps)). [batch, H, W, C] -> [batch, N, p * p * C]."""
    patches = patchify(images, patch_size)
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True)
    return (patches - mean) / (var + eps) ** 0.5
