"""Image classification (task "classify_image"): labelled images -> one of num_classes,
through the shared transformer's patch input (ViT; config.model.patch_size > 0).

Batch format (B = per-process batch):
  pixels         float32 [B, H, W, C]  in [0, 1] (augmented in training, see
                                       train/data/image_augmentation.py)
  segment_ids    int32   [B, 1 + N]    all 1: every [CLS] and patch position is real (the
                                       model's attention mask; counted for tokens/s)
  labels         int32   [B]           (classification only)
  example_weight float32 [B]           1 for real rows; 0 for eval's filler rows
The iterators are grain DatasetIterators (`get_state` / `set_state` resume exactly), as
the text pipelines (train/data/pipeline.py), whose sampling, sharding and eval padding
they share; `config.data.label_fraction` and `sampling` apply as for text.
"""

from __future__ import annotations

import grain
import numpy as np

from model import patches
from train.data import image_augmentation, pipeline, sources
from train.tasks.classify import Classify
from train.tasks.registry import register


class _ImageBatch(grain.transforms.Map):
    """A list of examples -> one batch dict (see the module docstring)."""

    def __init__(self, labels: bool, seq_len: int):
        self._labels, self._len = labels, seq_len

    def map(self, examples: list[dict]) -> dict[str, np.ndarray]:
        batch = {"pixels": np.stack([ex["image"] for ex in examples]).astype(np.float32),
                 "segment_ids": np.ones((len(examples), self._len), np.int32),
                 "example_weight": np.array([ex.get("example_weight", 1.0) for ex in examples],
                                            np.float32)}
        if self._labels:
            batch["labels"] = np.array([ex["label"] for ex in examples], np.int32)
        return batch


def make_train_iterator(source, data_cfg, *, seed: int, with_labels: bool = True,
                        transform=None, process_index=None, process_count=None):
    """Infinite, shuffled, deterministic in `seed`; examples augmented per
    `config.data.image_*` (keyed by their index in the stream), then batched; each
    process reads a disjoint 1/process_count slice. `transform`: IterDataset of batches
    -> IterDataset (e.g. masked_patches' masking)."""
    p, n = pipeline._process(process_index, process_count)
    batch = pipeline.per_process_batch(data_cfg.batch_size, n, "batch_size")
    if len(source) == 0:
        raise ValueError("The training split is empty")
    ds = pipeline._example_stream(source, data_cfg, pipeline._train_seed(seed, data_cfg),
                                  labelled=True)
    augment = image_augmentation.train_transform(data_cfg, seed=seed)
    if augment is not None:  # Before sharding: draws keyed by the global stream index.
        ds = augment(ds)
    ds = ds[p::n].batch(batch, drop_remainder=True, batch_fn=list)
    it = ds.map(_ImageBatch(with_labels, data_cfg.seq_len)).to_iter_dataset(pipeline._READ)
    return pipeline.finish_train_iterator(it, data_cfg, transform)


def make_eval_iterator(source, data_cfg, *, with_labels: bool = True, transform=None,
                       process_index=None, process_count=None):
    """One in-order pass, each example once across processes, the tail filled with
    weight-0 rows (pipeline.make_eval_iterator's contract); never augmented."""
    p, n = pipeline._process(process_index, process_count)
    batch = pipeline.per_process_batch(data_cfg.eval_batch_size, n, "eval_batch_size")
    if len(source) == 0:
        raise ValueError("The evaluation split is empty")
    length = pipeline.num_eval_batches(len(source), data_cfg.eval_batch_size, n) * batch
    ds = grain.MapDataset.source(pipeline._PaddedShard(source, p, n, length))
    ds = ds.batch(batch, drop_remainder=True, batch_fn=list)
    it = ds.map(_ImageBatch(with_labels, data_cfg.seq_len)).to_iter_dataset(pipeline._READ)
    return iter(it if transform is None else transform(it))


def check_image_config(config, task_name: str) -> None:
    """What every image task needs of `config`; a ValueError naming the key."""
    m = config.model
    if not m.patch_size:
        raise ValueError(f"config.task={task_name!r} reads images: set config.model."
                         f"patch_size > 0 and config.model.image_shape (configs/vision.py)")
    rows, columns = patches.check_patch_size(m.image_shape, m.patch_size)
    if config.data.source != "images":
        raise ValueError(f"config.task={task_name!r} needs config.data.source='images' "
                         f"(has {config.data.source!r}); configs/vision.py sets it")
    if config.data.seq_len != 1 + rows * columns:
        raise ValueError(f"config.data.seq_len={config.data.seq_len}; image input is [CLS] + "
                         f"{rows * columns} patches: set it to {1 + rows * columns}")
    image_augmentation.check(config.data)


def check_image_shape(config, source, split) -> None:
    shape = tuple(source.images.shape[1:])
    if shape != tuple(config.model.image_shape):
        where = config.data.get("image_dir", "") or "scikit-learn's digits"
        raise ValueError(f"The images of {where} (config.data.image_dir) split {split!r} are "
                         f"{shape} (height, width, channels) but config.model.image_shape="
                         f"{tuple(config.model.image_shape)}; set it to {shape}")


class ImageTask(Classify):
    """What the image tasks share: pixels in, no tokenizer."""

    input_field = "pixels"
    token_fields = (("segment_ids", "segment_ids"),)  # Positions: [CLS] + patches.
    measures_forgetting = False

    def tokenizer(self, data_cfg):
        return None

    def prepare_data(self, data_cfg):
        sources.load_split(data_cfg, data_cfg.train_split)

    def image_fields(self, config, rows):
        return {"pixels": ((rows, *config.model.image_shape), "float32"),
                "segment_ids": ((rows, config.data.seq_len), "int32"),
                "example_weight": ((rows,), "float32")}


class ClassifyImage(ImageTask):
    name = "classify_image"

    def check(self, config):
        super().check(config)  # The classify head.
        check_image_config(config, self.name)

    def check_source(self, config, source, split):
        super().check_source(config, source, split)
        check_image_shape(config, source, split)

    def train_iterator(self, source, tok, data_cfg, seed):
        return make_train_iterator(source, data_cfg, seed=seed)

    def eval_iterator(self, source, tok, data_cfg):
        return make_eval_iterator(source, data_cfg)

    def batch_fields(self, config, rows):
        return self.image_fields(config, rows) | {"labels": ((rows,), "int32")}


register(ClassifyImage())
