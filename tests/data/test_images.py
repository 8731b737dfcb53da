"""Image data: the digits builder's counts and stratified split against scikit-learn's
arrays, a user's folder through the same builder, the bad-input errors, and the
augmentation's determinism and resumption."""

import sys

import ml_collections
import numpy as np
import pytest

from train.data import image_augmentation, images, sources
from train.tasks import classify_image

PIL = pytest.importorskip("PIL.Image")  # Pillow reads folders; installed with matplotlib.


def data_config(data_dir, **fields):
    cfg = ml_collections.ConfigDict(dict(
        source="images", image_dir="", data_dir=str(data_dir), label_fraction=1.0,
        train_split="train", eval_split="validation", test_split="test", batch_size=8,
        eval_batch_size=16, seq_len=17, shuffle_buffer_seed=0, worker_count=0,
        sampling="uniform", image_rotation=0.0, image_flip=False, image_shift=0,
        image_noise=0.0))
    cfg.update(fields)
    return cfg


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_tfds")


def _rows(array):
    return sorted(map(bytes, np.ascontiguousarray(array, np.float32).reshape(len(array), -1)))


def test_digits_counts_and_stratified_split(digits_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    cfg = data_config(digits_dir)
    splits = {s: sources.load_split(cfg, s) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 1439, "validation": 179,
                                                      "test": 179}
    counts = np.bincount(digits.target)
    for split, src in splits.items():
        per_class = np.bincount(sources.label_array(src), minlength=10)
        expected = [round(0.1 * n) for n in counts]
        if split == "train":
            expected = [n - 2 * round(0.1 * n) for n in counts]
        np.testing.assert_array_equal(per_class, expected)
        assert src.images.shape[1:] == (8, 8, 1) and src.label_names == [str(i) for i in range(10)]
    # Every digit lands in exactly one split, pixels 0..16 scaled to [0, 1], with its label.
    ours = np.concatenate([np.concatenate([s.images.reshape(len(s), -1),
                                           sources.label_array(s)[:, None]], 1)
                           for s in splits.values()])
    theirs = np.concatenate([digits.images.reshape(1797, -1) / 16.0, digits.target[:, None]], 1)
    assert _rows(ours) == _rows(theirs)


def test_label_fraction_is_stratified(digits_dir):
    src = sources.load_split(data_config(digits_dir, label_fraction=0.1), "train")
    train_counts = np.bincount(sources.label_array(
        sources.load_split(data_config(digits_dir), "train")), minlength=10)
    np.testing.assert_array_equal(np.bincount(sources.label_array(src), minlength=10),
                                  [max(1, round(0.1 * n)) for n in train_counts])


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(array).save(path)


def test_folder_through_the_same_builder(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for name in ("cat", "dog"):
        for i in range(10):
            pixels = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
            write_png(tmp_path / "imgs" / name / f"{i}.png", pixels)
            written[pixels.tobytes()] = name
    cfg = data_config(tmp_path / "tfds", image_dir=str(tmp_path / "imgs"))
    splits = {s: sources.load_split(cfg, s) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 16, "validation": 2, "test": 2}
    for src in splits.values():
        assert src.label_names == ["cat", "dog"]
        for i in range(len(src)):
            example = src[i]
            raw = np.round(example["image"] * 255).astype(np.uint8)
            assert written[raw.tobytes()] == src.label_names[example["label"]]


def test_bad_folders_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no class sub-folders"):
        images.read_folder(empty)
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"x\.png: not a readable image"):
        images.read_folder(tmp_path / "bad")
    write_png(tmp_path / "mixed" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "mixed" / "b" / "1.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(ValueError,
                       match=r"1\.png: 4x5 pixels \(width x height\), but .*0\.png is 4x4"):
        images.read_folder(tmp_path / "mixed")
    with pytest.raises(FileNotFoundError, match="config.data.image_dir="):
        images.read_folder(tmp_path / "nowhere")


def test_missing_scikit_learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import -> ImportError.
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        images.load_digits()


def test_shift_against_padding_and_cropping():
    image = np.arange(20, dtype=np.float32).reshape(4, 5, 1)
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    for dy, dx in ((1, -2), (-1, 0), (2, 2), (0, 0)):
        crop = padded[2 - dy:6 - dy, 2 - dx:7 - dx]
        np.testing.assert_array_equal(image_augmentation.shift(image, dy, dx), crop)


def test_flip_only_mirrors():
    image = np.random.default_rng(0).random((8, 8, 1)).astype(np.float32)
    cfg = image_augmentation.ImageAugmentationConfig(flip=True)
    outs = [image_augmentation.augment_image(image, np.random.default_rng(s), cfg)
            for s in range(8)]
    assert all(np.array_equal(o, image) or np.array_equal(o, image[:, ::-1]) for o in outs)
    assert any(np.array_equal(o, image[:, ::-1]) for o in outs)


AUGMENT = dict(image_rotation=10.0, image_shift=1, image_noise=0.05)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_augmentation_is_deterministic_and_resumes(digits_dir):
    cfg = data_config(digits_dir, **AUGMENT)
    src = sources.load_split(cfg, "train")
    first = take(classify_image.make_train_iterator(src, cfg, seed=3), 5)
    again = classify_image.make_train_iterator(src, cfg, seed=3)
    head = take(again, 2)
    state = again.get_state()
    resumed = classify_image.make_train_iterator(src, cfg, seed=3)
    resumed.set_state(state)
    for a, b in zip(first, head + take(resumed, 3)):
        np.testing.assert_array_equal(a["pixels"], b["pixels"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    # Same examples as without augmentation (labels), but the pixels changed.
    plain = take(classify_image.make_train_iterator(src, data_config(digits_dir), seed=3), 5)
    for a, p in zip(first, plain):
        np.testing.assert_array_equal(a["labels"], p["labels"])
        assert np.abs(a["pixels"] - p["pixels"]).mean() > 0.01
    other = take(classify_image.make_train_iterator(src, cfg, seed=4), 1)
    assert not np.array_equal(other[0]["pixels"], first[0]["pixels"])


@pytest.mark.parametrize("field, value, message", [
    ("image_rotation", -1.0, "config.data.image_rotation"),
    ("image_shift", 1.5, "config.data.image_shift"),
    ("image_noise", -0.1, "config.data.image_noise"),
])
def test_bad_augmentation_names_the_key(field, value, message):
    with pytest.raises(ValueError, match=message):
        image_augmentation.check(ml_collections.ConfigDict({field: value}))
