"""Labelled images as a tfds dataset (array_record, no TensorFlow): scikit-learn's
handwritten digits by default, or the user's own folder of images.

`config.data.source = "images"` with `config.data.image_dir`:
  * "" (default): `sklearn.datasets.load_digits`, 1,797 8x8 grey images of the digits 0-9
    (inside the scikit-learn wheel: nothing is downloaded); pixels 0..16 -> [0, 1].
  * a folder with one sub-folder per class (its name is the class name; classes sorted)
    holding PNG/JPEG images read with Pillow; pixels 0..255 -> [0, 1]. Every image must
    have the same size; grey images stay 1-channel unless some image is colour, then all
    are RGB.

Splits: fixed and stratified (`stratified_split`): per class, a permutation seeded by 0
gives round(10%) to validation, round(10%) to test, the rest to train; a class of n
images keeps at least one training image. The same images always land in the same split.

Cache: `<data_dir>/strata_images/<name>-<fingerprint>/1.0.0`; the fingerprint hashes the
images' bytes and class names (a folder's) or scikit-learn's digits array, so an edited
folder is rebuilt, never served stale.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from train.data.builder_base import LocalBuilder
from train.data.records import TfdsSplit

SPLIT_FRACTIONS = {"validation": 0.1, "test": 0.1}  # The rest is train.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_SPLIT_SEED = 0
_FINGERPRINT_CHARS = 16


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Every image of a dataset: pixels float32 [n, H, W, C] in [0, 1], labels int64 [n],
    class names, and a description of where they came from."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    origin: str


def load_digits() -> ImageSet:
    """scikit-learn's digits, or an ImportError saying how to install it."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as e:
        raise ImportError(
            "config.data.source='images' with config.data.image_dir='' reads scikit-learn's "
            "handwritten digits, but scikit-learn is not installed: `pip install "
            "scikit-learn` (or set config.data.image_dir to a folder of images)") from e
    digits = sklearn_digits()
    images = (digits.images[..., None] / 16.0).astype(np.float32)  # 0..16 -> [0, 1].
    return ImageSet(images, digits.target.astype(np.int64),
                    tuple(str(c) for c in digits.target_names), "sklearn.datasets.load_digits")


def _pillow():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("config.data.image_dir (a folder of PNG/JPEG images) is read "
                          "with Pillow, which is not installed: `pip install pillow`") from e
    return Image


def class_files(image_dir) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """-> (class names, [(file, class id)]) of a folder with one sub-folder per class."""
    root = Path(image_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"config.data.image_dir={str(image_dir)!r} is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"config.data.image_dir={str(root)!r} has no class sub-folders; "
                         f"expected one sub-folder per class holding its "
                         f"{'/'.join(IMAGE_SUFFIXES)} images")
    files = []
    for label, name in enumerate(classes):
        found = sorted(f for f in (root / name).iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ValueError(f"class folder {str(root / name)!r} (config.data.image_dir) "
                             f"holds no {'/'.join(IMAGE_SUFFIXES)} image")
        files += [(f, label) for f in found]
    return tuple(classes), files


def read_folder(image_dir) -> ImageSet:
    """Every image of `image_dir` (see the module docstring); a ValueError naming the
    file for an unreadable image or one whose size differs from the first's."""
    Image = _pillow()
    classes, files = class_files(image_dir)
    decoded, size = [], None
    for path, _ in files:
        try:
            with Image.open(path) as image:
                image.load()
                colour = image.mode not in ("1", "L", "I", "I;16", "F", "LA", "P") or (
                    image.mode == "P" and "RGB" in image.palette.mode)
                decoded.append((image.convert("RGB" if colour else "L"), colour))
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{path}: not a readable image ({e}); config.data.image_dir "
                             f"must hold only PNG/JPEG images in its class folders") from None
        if size is None:
            size, first = decoded[-1][0].size, path
        elif decoded[-1][0].size != size:
            raise ValueError(
                f"{path}: {decoded[-1][0].size[0]}x{decoded[-1][0].size[1]} pixels (width x "
                f"height), but {first} is {size[0]}x{size[1]}; every image of "
                f"config.data.image_dir must have the same size (resize them first)")
    any_colour = any(colour for _, colour in decoded)
    images = np.stack([
        np.asarray(image.convert("RGB") if any_colour else image, np.float32).reshape(
            size[1], size[0], -1) / 255.0 for image, _ in decoded])
    return ImageSet(images, np.array([label for _, label in files], np.int64), classes,
                    str(Path(image_dir).expanduser().resolve()))


def stratified_split(labels, fractions=None, seed=_SPLIT_SEED) -> dict[str, np.ndarray]:
    """{split: sorted indices}: per class, a seeded permutation gives round(fraction * n)
    to each of `fractions`' splits in order and the rest (>= 1 when n >= 1) to train."""
    fractions = SPLIT_FRACTIONS if fractions is None else fractions
    rng = np.random.default_rng(seed)
    out = {"train": [], **{split: [] for split in fractions}}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for split, fraction in fractions.items():
            take = min(round(fraction * len(idx)), max(len(idx) - start - 1, 0))
            out[split].append(idx[start:start + take])
            start += take
        out["train"].append(idx[start:])
    return {split: np.sort(np.concatenate(parts)) for split, parts in out.items()}


@dataclasses.dataclass(eq=False)
class ImagesConfig(tfds.core.BuilderConfig):
    image_dir: str = ""  # "" = scikit-learn's digits.
    image_shape: tuple[int, int, int] = (8, 8, 1)
    class_names: tuple[str, ...] = ()


def read_images(image_dir: str) -> ImageSet:
    return read_folder(image_dir) if image_dir else load_digits()


def make_config(image_dir: str) -> ImagesConfig:
    """Reads (and checks) every image once: its shape and classes fix the features, its
    bytes the fingerprint."""
    images = read_images(image_dir)
    h = hashlib.sha256(images.images.tobytes())
    h.update(images.labels.tobytes())
    h.update("\0".join(images.class_names).encode())
    name = "digits" if not image_dir else Path(images.origin).name or "images"
    safe = "".join(ch if ch.isalnum() or ch in "_." else "_" for ch in name)
    return ImagesConfig(name=f"{safe}-{h.hexdigest()[:_FINGERPRINT_CHARS]}",
                        description=f"Images from {images.origin}",
                        image_dir=images.origin if image_dir else "",
                        image_shape=tuple(int(v) for v in images.images.shape[1:]),
                        class_names=images.class_names)


class Images(LocalBuilder, skip_registration=True):
    """Labelled images: `image` float32 [H, W, C] in [0, 1], `label` (ClassLabel)."""

    name = "strata_images"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images in [0, 1], seeded stratified 80/10/10 split."}

    def __init__(self, *, config: ImagesConfig, **kwargs):
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=cfg.image_shape, dtype=np.float32),
                "label": tfds.features.ClassLabel(names=list(cfg.class_names)),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Local files (or the scikit-learn wheel) only.
        images = read_images(self.builder_config.image_dir)
        splits = stratified_split(images.labels)
        return {split: self._generate_examples(images, idx) for split, idx in splits.items()
                if len(idx)}

    def _generate_examples(self, images: ImageSet, indices):
        for i in indices:
            yield int(i), {"image": images.images[i], "label": int(images.labels[i])}


@functools.lru_cache(maxsize=8)
def _config(image_dir: str, stats: tuple) -> ImagesConfig:
    del stats  # Part of the cache key only: a changed folder is read again.
    return make_config(image_dir)


def _folder_stats(image_dir: str) -> tuple:
    if not image_dir or not os.path.isdir(os.path.expanduser(image_dir)):
        return ()
    return tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in Path(image_dir).expanduser().rglob("*") if p.is_file()))


def builder(data_cfg, data_dir: str) -> Images:
    """The prepared builder for `config.data.image_dir` (built on first use)."""
    image_dir = str(data_cfg.get("image_dir", "") or "")
    b = Images(config=_config(image_dir, _folder_stats(image_dir)), data_dir=data_dir)
    return b if b.is_prepared() else b.prepare()


class ImageSplit:
    """One split held in memory (the datasets this serves are small): `len`, and `[i]`
    -> {"image": float32 [H, W, C], "label": int}; `images` / `labels` are the arrays."""

    def __init__(self, b: Images, split: str, name: str):
        reader = TfdsSplit(b.info, split, {"image": "image", "label": "label"})
        rows = list(reader.iter_range())
        shape = b.builder_config.image_shape
        self.images = np.stack([r["image"] for r in rows]).astype(np.float32).reshape(
            len(rows), *shape) if rows else np.zeros((0, *shape), np.float32)
        self.labels = np.array([r["label"] for r in rows], np.int64)
        self.labelled = True
        self.label_names = list(b.builder_config.class_names)
        self.name = name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        return {"image": self.images[index], "label": int(self.labels[index])}


def load_split(data_cfg, split: str, data_dir: str) -> ImageSplit:
    b = builder(data_cfg, data_dir)
    if split not in b.info.splits:
        raise KeyError(f"Split {split!r} not in {b.name} ({b.data_dir}); available: "
                       f"{sorted(b.info.splits.keys())}")
    return ImageSplit(b, split, f"{b.name}_{b.builder_config.name}")
