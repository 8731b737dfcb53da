"""Image augmentation of training examples: small rotation, label-preserving flips,
random shift (a crop of the zero-padded image), additive Gaussian noise.

Fields of `config.data` (configs/vision.py sets them; absent = off):
  image_rotation  degrees: each image turns by U(-r, r) (bilinear, zero fill); 0 = off.
  image_flip      mirror left-right with probability 1/2. Only where mirroring keeps the
                  label: never for digits (a mirrored 2, 3, 5, 7 is not that digit).
  image_shift     pixels: shift by integers dy, dx ~ U{-s..s}, zero fill; 0 = off.
  image_noise     std of Gaussian noise added to the [0, 1] pixels (then clipped); 0 = off.
Order: rotation, flip, shift, noise.

Randomness: grain's `random_map` on the example stream gives example k of the (shuffled,
repeated) stream a Generator keyed by (seed, k); k is the iterator's position, saved in
its state, so a restored iterator augments exactly as an uninterrupted one, and the
draws do not depend on the batch size or process count. Training only.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np
from scipy import ndimage

_AUGMENT_SALT = 0x696D67  # Separates the augmentation seed from the shuffle/mask seeds.


@dataclasses.dataclass(frozen=True)
class ImageAugmentationConfig:
    rotation: float = 0.0
    flip: bool = False
    shift: int = 0
    noise: float = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.rotation or self.flip or self.shift or self.noise)


def check(data_cfg) -> ImageAugmentationConfig:
    """The augmentation `config.data` asks for; a ValueError naming a bad key."""
    get = data_cfg.get
    cfg = ImageAugmentationConfig(float(get("image_rotation", 0.0)),
                                  bool(get("image_flip", False)),
                                  get("image_shift", 0), float(get("image_noise", 0.0)))
    if not 0.0 <= cfg.rotation <= 180.0:
        raise ValueError(f"config.data.image_rotation={cfg.rotation} must be in [0, 180] "
                         f"degrees")
    if isinstance(cfg.shift, bool) or not isinstance(cfg.shift, int | np.integer) or cfg.shift < 0:
        raise ValueError(f"config.data.image_shift={cfg.shift!r} must be a whole number of "
                         f"pixels >= 0")
    if cfg.noise < 0.0:
        raise ValueError(f"config.data.image_noise={cfg.noise} must be >= 0 (a std)")
    return cfg


def augment_seed(seed: int) -> int:
    """The run seed -> the augmentation seed (uint32), distinct from the shuffle's."""
    return int(np.random.SeedSequence([int(seed), _AUGMENT_SALT]).generate_state(1)[0])


def shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """[H, W, C] moved down by dy and right by dx (negative: up/left), zeros shifted in."""
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def augment_image(image: np.ndarray, rng: np.random.Generator,
                  cfg: ImageAugmentationConfig) -> np.ndarray:
    """One image [H, W, C] in [0, 1] -> its augmented copy (float32). Every draw is
    made whether or not its transform is on, so turning one on leaves the others' draws
    unchanged."""
    angle = rng.uniform(-1.0, 1.0) * cfg.rotation
    flip = rng.random() < 0.5
    dy, dx = rng.integers(-cfg.shift, cfg.shift + 1, size=2)
    noise = rng.standard_normal(image.shape)
    out = np.asarray(image, np.float32)
    if cfg.rotation:
        out = ndimage.rotate(out, angle, axes=(0, 1), reshape=False, order=1,
                             mode="constant", cval=0.0)
    if cfg.flip and flip:
        out = out[:, ::-1]
    if cfg.shift:
        out = shift(out, int(dy), int(dx))
    if cfg.noise:
        out = out + cfg.noise * noise
    return np.clip(out, 0.0, 1.0).astype(np.float32)


class ImageAugmentation(grain.transforms.RandomMap):
    """{"image": [H, W, C], ...} -> the same with the image augmented (use with random_map)."""

    def __init__(self, cfg: ImageAugmentationConfig):
        self._cfg = cfg

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        return {**example, "image": augment_image(example["image"], rng, self._cfg)}


def train_transform(data_cfg, *, seed: int):
    """MapDataset of examples -> augmented MapDataset, or None when all is off."""
    cfg = check(data_cfg)
    if not cfg.enabled:
        return None
    augmentation = ImageAugmentation(cfg)
    return lambda ds: ds.random_map(augmentation, seed=augment_seed(seed))
