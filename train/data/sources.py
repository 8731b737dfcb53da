"""`config.data` -> random-access splits of {"text": str, "label": int} dicts.

`data_cfg.source` picks the dataset:
  * "wordnet": WordNet 3.0 synsets labelled by lexicographer file (built on first use).
  * "tfds":    any tfds dataset already prepared (array_record) in the data dir.
  * "local":   the user's .txt / .jsonl files (built on first use, rebuilt when they change).
  * "images":  labelled images, {"image": float32 [H, W, C], "label": int}: scikit-learn's
               digits or `data_cfg.image_dir`'s class folders (train/data/images.py).
Nothing is downloaded at run time.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from train.data import images, local_corpus, wordnet
from train.data.records import Subset, TfdsSplit, WithExamples

log = logging.getLogger("strata")
SOURCES = ("wordnet", "tfds", "local", "images")
DEFAULT_DATA_DIR = "~/.cache/strata/tfds"
_SUBSET_SEED = 0  # label_fraction's subset depends on the fraction only, not the run seed.


def data_dir(data_cfg) -> str:
    """`data_cfg.data_dir`, else `$STRATA_DATA_DIR`, else ~/.cache/strata/tfds."""
    d = data_cfg.data_dir or os.environ.get("STRATA_DATA_DIR") or DEFAULT_DATA_DIR
    return str(Path(d).expanduser())


def _check_source(data_cfg) -> str:
    if data_cfg.source not in SOURCES:
        raise ValueError(f"config.data.source={data_cfg.source!r}; choose one of {SOURCES}")
    return data_cfg.source


@functools.lru_cache(maxsize=16)
def _local_config(files: tuple, stats: tuple, name: str, text_key: str, label_key: str):
    del stats  # Part of the cache key only: re-fingerprint when a file changes.
    return local_corpus.make_config(files, name, text_key, label_key)


def _file_stats(files) -> tuple:
    out = []
    for f in files:
        try:
            st = os.stat(Path(f).expanduser())
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)  # make_config raises the error naming the file.
    return tuple(out)


def builder(data_cfg) -> tfds.core.DatasetBuilder:
    """The prepared tfds builder for `data_cfg` (wordnet/local are built if needed)."""
    source, dd = _check_source(data_cfg), data_dir(data_cfg)
    if source == "images":
        return images.builder(data_cfg, dd)
    if source == "wordnet":
        b = wordnet.Wordnet(wordnet_dir=data_cfg.wordnet_dir or None, data_dir=dd)
        if not b.is_prepared():
            wordnet.check_wordnet_dir(b.wordnet_dir)  # Fail before tfds makes any dir.
            b.prepare()
        return b
    if source == "local":
        files = tuple(str(f) for f in data_cfg.local_files)
        cfg = _local_config(
            files, _file_stats(files), data_cfg.local_name, data_cfg.text_key, data_cfg.label_key
        )
        b = local_corpus.LocalCorpus(config=cfg, data_dir=dd)
        return b if b.is_prepared() else b.prepare()
    if not data_cfg.tfds_name:
        raise ValueError(
            'config.data.source="tfds" needs config.data.tfds_name (e.g. "imdb_reviews")'
        )
    try:
        b = tfds.builder(data_cfg.tfds_name, data_dir=dd)
    except tfds.core.DatasetNotFoundError as e:
        raise ValueError(
            f"config.data.tfds_name={data_cfg.tfds_name!r} is not a tfds dataset (nor prepared "
            f"in {dd!r}); nothing is downloaded at run time"
        ) from e
    if not b.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {data_cfg.tfds_name!r} is not prepared in {b.data_dir!r} (data dir "
            f"{dd!r}); nothing is downloaded at run time. Prepare it where there is network: "
            f"`tfds build {data_cfg.tfds_name} --data_dir={dd} --file_format=array_record`, "
            "then copy the directory here or point config.data.data_dir / $STRATA_DATA_DIR at it."
        )
    if b.info.file_format is None or b.info.file_format.value != "array_record":
        raise ValueError(
            f"tfds dataset {data_cfg.tfds_name!r} in {b.data_dir!r} is stored as "
            f"{b.info.file_format}; random access needs array_record: rebuild with "
            f"`tfds build {data_cfg.tfds_name} --data_dir={dd} --file_format=array_record`"
        )
    return b


def dataset_name(data_cfg) -> str:
    """A file-name-safe id of the dataset (keys the tokenizer cache)."""
    source = _check_source(data_cfg)
    if source == "wordnet":
        name = wordnet.Wordnet.name
    elif source in ("local", "images"):  # Includes the fingerprint.
        name = f"{source}_{builder(data_cfg).builder_config.name}"
    else:
        name = data_cfg.tfds_name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _label_info(data_cfg, b) -> tuple[bool, list[str] | None]:
    """(labelled, class names or None)."""
    if data_cfg.source == "wordnet":
        return True, list(wordnet.LEXNAMES)
    key = "label" if data_cfg.source == "local" else data_cfg.label_key
    if not key:
        return False, None
    try:
        feature = _feature(b.info.features, key)
    except (KeyError, TypeError):
        return False, None
    if isinstance(feature, tfds.features.ClassLabel):
        return True, list(feature.names)
    return True, None


def _feature(features, key: str):
    node = features
    for part in key.split("/"):
        node = node[part]
    return node


def label_names(data_cfg) -> list[str] | None:
    """Class names indexed by label id; None when unlabelled or the labels are unnamed ints."""
    return _label_info(data_cfg, builder(data_cfg))[1]


def _split_reader(data_cfg, b, split: str, fields: dict, **kw) -> TfdsSplit:
    try:
        b.info.splits[split]
    except (KeyError, ValueError) as e:
        available = sorted(b.info.splits.keys())
        extra = (
            " (local corpora split documents 98/1/1 by hash; a tiny corpus can leave "
            "validation/test empty, and empty splits are not written)"
            if data_cfg.source == "local"
            else ""
        )
        raise KeyError(
            f"Split {split!r} not in {b.name} ({b.data_dir}); available: {available}{extra}"
        ) from e
    return TfdsSplit(b.info, split, fields, **kw)


def load_split(data_cfg, split: str, *, extra_fields: tuple[str, ...] = ()):
    """Random-access split: `len(src)`, `src[i] -> {"text": str, "label": int, ...}`.

    `label` is present when the dataset is labelled (`src.labelled`; names in
    `src.label_names`). `extra_fields` copies further features by name (e.g. "lemmas").
    On `data_cfg.train_split`, `label_fraction < 1` keeps a deterministic subset,
    stratified by label when labelled (at least one example per class).
    Source "images": {"image": float32 [H, W, C], "label": int} (train/data/images.py).
    """
    if _check_source(data_cfg) == "images":
        return with_label_fraction(images.load_split(data_cfg, split, data_dir(data_cfg)),
                                   data_cfg, split)
    b = builder(data_cfg)
    labelled, names = _label_info(data_cfg, b)
    if data_cfg.source == "tfds":
        fields = {"text": data_cfg.text_key}
        if labelled:
            fields["label"] = data_cfg.label_key
    else:  # wordnet and local corpora store "text" / "label" themselves.
        fields = {"text": "text", **({"label": "label"} if labelled else {})}
    with_examples = data_cfg.source == "wordnet" and data_cfg.wordnet_text != "gloss"
    if with_examples and data_cfg.wordnet_text != "gloss_and_examples":
        raise ValueError(f"config.data.wordnet_text={data_cfg.wordnet_text!r}; expected "
                         f"'gloss' or 'gloss_and_examples'")
    fields.update({k: k for k in (*extra_fields, *(("examples",) if with_examples else ()))})
    src = _split_reader(
        data_cfg,
        b,
        split,
        fields,
        labelled=labelled,
        label_names=names,
        name=dataset_name(data_cfg),
    )
    if with_examples:
        src = WithExamples(src)
    return with_label_fraction(src, data_cfg, split)


def with_label_fraction(src, data_cfg, split: str):
    """`src`, or on the train split with `label_fraction < 1` its `subset_indices`."""
    fraction = float(data_cfg.label_fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"config.data.label_fraction={fraction} must be in (0, 1]")
    if fraction < 1.0 and split == data_cfg.train_split:
        src = Subset(src, subset_indices(src, fraction))
    return src


def subset_indices(src: TfdsSplit, fraction: float, seed: int = _SUBSET_SEED) -> np.ndarray:
    """Sorted indices of a `fraction` of `src`; per class when labelled."""
    rng = np.random.default_rng(seed)
    n = len(src)
    if not src.labelled:
        return np.sort(rng.permutation(n)[: max(1, round(fraction * n))])
    labels = label_array(src)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.permutation(idx)[: max(1, round(fraction * len(idx)))])
    return np.sort(np.concatenate(keep))


# Labels read once per split reader (a bulk read: ~2 s for WordNet's 94k training records
# on 2 cores; reading them one by one costs as much again per pass).
_LABELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def label_array(source) -> np.ndarray:
    """int64 [len(source)]: every example's label, in order (read once per split reader)."""
    if isinstance(source, Subset):
        return label_array(source._source)[source.indices]
    if isinstance(source, WithExamples):
        return label_array(source._source)
    if isinstance(source, images.ImageSplit):
        return source.labels
    if isinstance(source, TfdsSplit):
        if source not in _LABELS:
            _LABELS[source] = np.fromiter(
                (ex["label"] for ex in source.iter_range(keys=("label",))), np.int64,
                len(source))
        return _LABELS[source]
    return np.fromiter((source[i]["label"] for i in range(len(source))), np.int64,
                       len(source))


def _dataset_description(data_cfg) -> str:
    if data_cfg.source == "local":
        return f"the local corpus {list(data_cfg.local_files)} (config.data.local_files)"
    if data_cfg.source == "tfds":
        return (f"tfds dataset {data_cfg.tfds_name!r} (label feature "
                f"config.data.label_key={data_cfg.label_key!r})")
    return f"the {data_cfg.source} dataset"


def check_labels(source, num_classes: int, split: str, data_cfg) -> None:
    """Raises ValueError unless every label of `source` (split `split` of `data_cfg`'s
    dataset) is a class of a `num_classes`-way classifier (`config.model.num_classes`).

    A dataset with class names must have at most `num_classes` of them. WordNet's and
    local corpora's labels are their class ids by construction (checked when built);
    a tfds dataset's are read once (tfds writes -1 for "no label", e.g. GLUE's test).
    """
    where = f"{_dataset_description(data_cfg)} split {split!r}"
    if not getattr(source, "labelled", True):
        raise ValueError(f"{where} has no labels, but a classifier trains and evaluates on "
                         f"labels; use a labelled dataset (config.data.label_key="
                         f"{data_cfg.label_key!r})")
    names = getattr(source, "label_names", None)
    if names is not None and len(names) > num_classes:
        raise ValueError(
            f"config.model.num_classes={num_classes} but {where} has labels up to "
            f"{len(names) - 1} ({len(names)} classes): set "
            f"config.model.num_classes={len(names)}")
    if names is None or data_cfg.source == "tfds":
        labels = label_array(source)
        if labels.size and labels.max() >= num_classes:
            top = int(labels.max())
            raise ValueError(
                f"config.model.num_classes={num_classes} but {where} has labels up to {top} "
                f"({top + 1} classes): set config.model.num_classes={top + 1}")
        if labels.size and labels.min() < 0:
            count = int((labels < 0).sum())
            raise ValueError(
                f"{where} has {count} of {labels.size} labels below 0 (e.g. {labels.min()}; "
                f"tfds writes -1 for an example without a label); a classifier needs labels "
                f"in [0, config.model.num_classes={num_classes}): use a labelled split")
    if names is not None and len(names) < num_classes:
        log.info("config.model.num_classes=%d: %s has %d classes; the other outputs are "
                 "never a target", num_classes, where, len(names))


def training_texts(data_cfg, limit: int | None = None) -> Iterator[str]:
    """Texts of the full train split (ignores label_fraction), at most `limit`, for the tokenizer.

    WordNet yields each synset's gloss, its example sentences and its lemmas (one line).
    """
    b = builder(data_cfg)
    split = data_cfg.train_split
    count = 0
    if data_cfg.source == "wordnet":
        fields = {"gloss": "gloss", "examples": "examples", "lemmas": "lemmas"}
        rows = (
            [ex["gloss"], *ex["examples"], " ".join(ex["lemmas"])]
            for ex in _split_reader(data_cfg, b, split, fields).iter_range()
        )
    else:
        key = data_cfg.text_key if data_cfg.source == "tfds" else "text"
        rows = (
            [ex["text"]] for ex in _split_reader(data_cfg, b, split, {"text": key}).iter_range()
        )
    for row in rows:
        for text in row:
            if limit is not None and count >= limit:
                return
            if text:
                count += 1
                yield text
