"""grain pipelines: random-access source -> tokenised, batched numpy dicts (per process).

Batch format (B = per-process batch, L = data_cfg.seq_len, or in training with
data_cfg.length_buckets one of those widths per batch, see `_EncodeBucketed`):
  tokens         int32   [B, L]  [CLS] pieces... [SEP], padded with [PAD]=0
  segment_ids    int32   [B, L]  1.. per packed sequence (always 1 unpacked), 0 on padding
  positions      int32   [B, L]  0.. restarting per sequence, 0 on padding
  example_weight float32 [B]     1 for real rows; 0 for eval's filler rows
  labels         int32   [B]     only for labelled, unpacked data

Iterators are grain DatasetIterators: `it.get_state()` is a JSON-serialisable dict and
`it.set_state(state)` resumes exactly where it was.

Both iterator factories take an optional `transform`: a function IterDataset -> IterDataset
applied to the stream of batches (before grain's worker processes, so it runs in them),
e.g. `train.tasks.masking.train_transform(...)` adding BERT's masked-LM fields.
"""

from __future__ import annotations

from collections.abc import Callable

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from train.data import sampling as sampling_lib
from train.data.tokenizer import Tokenizer

# Elements here are whole batches (or chunks), so a short buffer suffices; grain scans the
# buffer on every element, so a long one costs host time.
_READ = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)
_PACK_CHUNK = 64  # Examples tokenised per call before packing.
# Length buckets sort a window of this many batches: larger fills more batches with one
# bucket (fewer straddling ones) but shuffles less finely at the batch level.
_BUCKET_WINDOW = 16
BATCH_SPEC = PartitionSpec(("data", "fsdp"))  # Batch dim over data and fsdp mesh axes.


def _process(process_index, process_count) -> tuple[int, int]:
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if not 0 <= p < n:
        raise ValueError(f"process_index={p} out of range for process_count={n}")
    return p, n


def check_batch_sizes(config) -> None:
    """`config.data.batch_size` and `eval_batch_size` are whole numbers of examples >= 1."""
    for key in ("batch_size", "eval_batch_size"):
        _check_positive(config.data[key], key)


def _check_positive(value, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"config.data.{key}={value!r}; expected a whole number of examples "
                         f">= 1 (the global batch, split over the data and fsdp mesh axes)")


def per_process_batch(global_batch: int, process_count: int, key: str) -> int:
    _check_positive(global_batch, key)
    if global_batch % process_count:
        raise ValueError(
            f"config.data.{key}={global_batch} is not divisible by the {process_count} "
            "processes; each reads an equal share of the batch"
        )
    return global_batch // process_count


def _is_labelled(source) -> bool:
    labelled = getattr(source, "labelled", None)
    if labelled is None:  # Plain sequences of dicts (tests, ad-hoc data).
        labelled = len(source) > 0 and "label" in source[0]
    return bool(labelled)


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise ValueError(f"config.data.seq_len={seq_len} must leave room for [CLS] and [SEP]")


def _encode(tokenizer: Tokenizer, texts: list[str], seq_len: int) -> list[np.ndarray]:
    """Texts -> `[CLS] pieces... [SEP]` int32 arrays, each at most `seq_len` long."""
    cls, sep = tokenizer.cls_id, tokenizer.sep_id
    return [
        np.array([cls, *ids[: seq_len - 2], sep], np.int32) for ids in tokenizer.encode_batch(texts)
    ]


def _padded_batch(rows: list[np.ndarray], examples: list[dict], width: int, pad_id: int,
                  labels: bool) -> dict[str, np.ndarray]:
    """Encoded rows (each at most `width` long) + their examples -> one batch of `width`."""
    tokens = np.full((len(rows), width), pad_id, np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    lengths = np.array([len(r) for r in rows])
    real = np.arange(width)[None, :] < lengths[:, None]
    batch = {
        "tokens": tokens,
        "segment_ids": real.astype(np.int32),
        "positions": np.where(real, np.arange(width)[None, :], 0).astype(np.int32),
        "example_weight": np.array([ex.get("example_weight", 1.0) for ex in examples], np.float32),
    }
    if labels:
        batch["labels"] = np.array([ex["label"] for ex in examples], np.int32)
    return batch


class _EncodePadded(grain.transforms.Map):
    """A list of examples -> one padded batch dict (see the module docstring).

    Works on whole batches: one sentencepiece call and vectorised numpy per batch is ~3x
    faster than per-example maps (grain's per-element overhead dominates otherwise).
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, labels: bool):
        self._tok, self._len, self._labels = tokenizer, seq_len, labels

    def map(self, examples: list[dict]) -> dict[str, np.ndarray]:
        rows = _encode(self._tok, [ex["text"] for ex in examples], self._len)
        return _padded_batch(rows, examples, self._len, self._tok.pad_id, self._labels)


def check_length_buckets(data_cfg) -> tuple[int, ...]:
    """`config.data.length_buckets` as a tuple: () (off) or increasing widths >= 2 ending
    at `seq_len`."""
    buckets = tuple(data_cfg.get("length_buckets", ()) or ())
    if not buckets:
        return ()
    ok = (all(isinstance(b, int | np.integer) and not isinstance(b, bool) for b in buckets)
          and buckets[0] >= 2 and all(a < b for a, b in zip(buckets, buckets[1:]))
          and buckets[-1] == data_cfg.seq_len)
    if not ok:
        raise ValueError(f"config.data.length_buckets={buckets!r}; expected increasing widths "
                         f">= 2 ending at config.data.seq_len={data_cfg.seq_len} (or () for off)")
    if data_cfg.packing:
        raise ValueError("config.data.length_buckets needs config.data.packing=False (packed "
                         "rows are full already)")
    return tuple(int(b) for b in buckets)


class _EncodeBucketed(grain.transforms.MapWithIndex):
    """Window k of the global example stream (`num_batches` global batches of examples) ->
    this process's `num_batches` batches, each padded to a length bucket's width.

    The window's examples are stably sorted by the smallest bucket that fits them and cut
    into global batches of `rows * process_count` examples, so every example of the window
    lands in exactly one batch, which is padded to the bucket of its longest row (only the
    at most len(buckets) - 1 batches straddling two buckets mix them). The batches come out
    in a permutation seeded by (seed, k): deterministic, and resumable with the iterator.
    """

    def __init__(self, tokenizer: Tokenizer, buckets: tuple[int, ...], num_batches: int,
                 rows: int, process: tuple[int, int], labels: bool, seed: int):
        self._tok, self._buckets, self._num_batches = tokenizer, np.array(buckets), num_batches
        self._rows, (self._p, self._n), self._labels, self._seed = rows, process, labels, seed

    def map_with_index(self, k: int, examples: list[dict]) -> list[dict[str, np.ndarray]]:
        rows = _encode(self._tok, [ex["text"] for ex in examples], int(self._buckets[-1]))
        bucket = np.searchsorted(self._buckets, [len(r) for r in rows])  # Smallest that fits.
        order = np.argsort(bucket, kind="stable")  # Keeps the shuffled order within a bucket.
        global_rows = self._rows * self._n
        batches = []
        for b in range(self._num_batches):
            chosen = order[b * global_rows:(b + 1) * global_rows][self._p::self._n]
            width = int(self._buckets[bucket[order[(b + 1) * global_rows - 1]]])  # Global max.
            batches.append(_padded_batch([rows[i] for i in chosen], [examples[i] for i in chosen],
                                         width, self._tok.pad_id, self._labels))
        permutation = np.random.default_rng([self._seed, k]).permutation(self._num_batches)
        return [batches[i] for i in permutation]


class _EncodeChunk(grain.transforms.Map):
    """A list of examples -> list of {"tokens": int32 [n]} for packing."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int):
        self._tok, self._len = tokenizer, seq_len

    def map(self, examples: list[dict]) -> list[dict]:
        return [
            {"tokens": t} for t in _encode(self._tok, [ex["text"] for ex in examples], self._len)
        ]


class _Unchunk(grain.experimental.FlatMapTransform):
    def __init__(self, max_fan_out: int):
        self.max_fan_out = max_fan_out

    def flat_map(self, chunk: list) -> list:
        return chunk


def _rename_packed(row):
    return {
        "tokens": row["tokens"],
        "segment_ids": row["tokens_segment_ids"],
        "positions": row["tokens_positions"],
        "example_weight": np.float32(1.0),
    }


def chain_transforms(*transforms) -> Callable[[grain.IterDataset], grain.IterDataset] | None:
    """One `transform=` applying `transforms` in order (Nones skipped); None if all are."""
    chosen = [t for t in transforms if t is not None]
    if not chosen:
        return None

    def chained(ds: grain.IterDataset) -> grain.IterDataset:
        for t in chosen:
            ds = t(ds)
        return ds
    return chained


def _train_seed(seed: int, data_cfg) -> int:
    # Both the run seed and data.shuffle_buffer_seed change the order; uint32 for grain.
    return int(np.random.SeedSequence([seed, data_cfg.shuffle_buffer_seed]).generate_state(1)[0])


def _example_stream(source, data_cfg, seed: int, labelled: bool) -> grain.MapDataset:
    """The infinite stream of training examples `config.data.sampling` asks for."""
    sampling = data_cfg.get("sampling", "uniform")
    if sampling == "uniform":
        return grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    if sampling != "class_balanced":
        raise ValueError(f"config.data.sampling={sampling!r}; expected one of "
                         f"{sampling_lib.SAMPLINGS}")
    if not labelled:
        raise ValueError("config.data.sampling='class_balanced' needs a labelled training "
                         "split (config.data.label_key)")
    labels = sampling_lib.source_labels(source)
    return grain.MapDataset.source(sampling_lib.ClassBalancedStream(source, labels, seed))


def make_train_iterator(
    source,
    tokenizer: Tokenizer,
    data_cfg,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    with_labels: bool | None = None,
    transform: Callable[[grain.IterDataset], grain.IterDataset] | None = None,
) -> grain.DatasetIterator:
    """Infinite, shuffled (differently each epoch), deterministic in `seed`; with
    `data_cfg.sampling="class_balanced"`, i.i.d. class-balanced draws instead
    (train/data/sampling.py).

    Every process reads a disjoint 1/process_count slice of the shuffled stream.
    `data_cfg.length_buckets` (e.g. (16, 32, 48)): each batch is padded to the smallest of
    these widths that fits its rows, not to seq_len (`_EncodeBucketed`); still `batch_size`
    rows, the same examples in a slightly different order.
    `with_labels`: None -> labels iff the source is labelled and packing is off;
    True -> require them (error if packing); False -> never.
    Defaults for process_index/count: jax.process_index() / jax.process_count().
    `transform`: IterDataset of batches -> IterDataset (see the module docstring).
    """
    p, n = _process(process_index, process_count)
    batch = per_process_batch(data_cfg.batch_size, n, "batch_size")
    _check_seq_len(data_cfg.seq_len)
    if len(source) == 0:
        raise ValueError("The training split is empty")
    labelled = _is_labelled(source)
    if with_labels is None:
        with_labels = labelled and not data_cfg.packing
    elif with_labels and data_cfg.packing:
        raise ValueError(
            "Classification labels need config.data.packing=False (a packed row holds "
            "several examples)"
        )
    elif with_labels and not labelled:
        raise ValueError("with_labels=True but the source has no labels")

    buckets = check_length_buckets(data_cfg)
    ds = _example_stream(source, data_cfg, _train_seed(seed, data_cfg), labelled)
    if buckets:
        # Every process reads the same global window (so all agree on each batch's width)
        # and keeps its slice of each global batch: disjoint across processes.
        ds = ds.batch(_BUCKET_WINDOW * batch * n, drop_remainder=True, batch_fn=list)
        it = ds.map_with_index(_EncodeBucketed(
            tokenizer, buckets, _BUCKET_WINDOW, batch, (p, n), with_labels,
            _train_seed(seed, data_cfg))).to_iter_dataset(_READ)
        it = grain.experimental.FlatMapIterDataset(it, _Unchunk(_BUCKET_WINDOW))
    elif not data_cfg.packing:
        ds = ds[p::n]  # Shard after shuffle+repeat: disjoint across processes in every epoch.
        ds = ds.batch(batch, drop_remainder=True, batch_fn=list)
        it = ds.map(_EncodePadded(tokenizer, data_cfg.seq_len, with_labels)).to_iter_dataset(_READ)
    else:
        ds = ds[p::n]
        # Encode in chunks (fast), then feed examples one by one to grain's first-fit packer.
        ds = ds.batch(_PACK_CHUNK, drop_remainder=True, batch_fn=list)
        it = ds.map(_EncodeChunk(tokenizer, data_cfg.seq_len)).to_iter_dataset(_READ)
        it = grain.experimental.FlatMapIterDataset(it, _Unchunk(_PACK_CHUNK))
        it = grain.experimental.FirstFitPackIterDataset(
            it,
            length_struct={"tokens": data_cfg.seq_len},
            num_packing_bins=batch,
            shuffle_bins=False,  # The input is already shuffled.
        ).map(_rename_packed)
        it = it.batch(batch, drop_remainder=True)
    return finish_train_iterator(it, data_cfg, transform)


def finish_train_iterator(it: grain.IterDataset, data_cfg, transform=None):
    """Batched rows -> the iterator the loop reads: `transform` (e.g. a task's masking),
    then data_cfg.worker_count prefetching processes."""
    if transform is not None:
        it = transform(it)
    if data_cfg.worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (outside absl.app).
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
    return iter(it)


class _PaddedShard:
    """Process `index`'s strided shard of `source`, padded to `length` with weight-0 copies.

    Filler rows copy a real example (not all-[PAD] rows) so attention never sees an
    all-masked row; `example_weight` = 0 keeps them out of metrics.
    """

    def __init__(self, source, index: int, count: int, length: int):
        self._source = source
        self._indices = range(index, len(source), count)
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int):
        real = i < len(self._indices)
        j = self._indices[i] if real else (self._indices[0] if self._indices else 0)
        return {**self._source[j], "example_weight": 1.0 if real else 0.0}


def num_eval_batches(num_examples: int, eval_batch_size: int, process_count: int) -> int:
    """Batches every process yields for one eval pass (equal on all processes)."""
    batch = per_process_batch(eval_batch_size, process_count, "eval_batch_size")
    per_process = -(-num_examples // process_count)
    return -(-per_process // batch)


def make_eval_iterator(
    source,
    tokenizer: Tokenizer,
    data_cfg,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    with_labels: bool | None = None,
    transform: Callable[[grain.IterDataset], grain.IterDataset] | None = None,
) -> grain.DatasetIterator:
    """One in-order pass; each example exactly once across processes (process p gets
    p, p+n, ...). All processes yield `num_eval_batches(...)` batches; the tail is filled
    with `example_weight` 0 rows. Never packed (every row is one example).
    """
    p, n = _process(process_index, process_count)
    batch = per_process_batch(data_cfg.eval_batch_size, n, "eval_batch_size")
    _check_seq_len(data_cfg.seq_len)
    if len(source) == 0:
        raise ValueError("The evaluation split is empty")
    if with_labels is None:
        with_labels = _is_labelled(source)
    length = num_eval_batches(len(source), data_cfg.eval_batch_size, n) * batch
    ds = grain.MapDataset.source(_PaddedShard(source, p, n, length))
    ds = ds.batch(batch, drop_remainder=True, batch_fn=list)
    it = ds.map(_EncodePadded(tokenizer, data_cfg.seq_len, with_labels)).to_iter_dataset(_READ)
    return iter(it if transform is None else transform(it))


def to_global_batch(local_batch: dict, mesh, batch_spec: PartitionSpec = BATCH_SPEC) -> dict:
    """Per-process numpy batch -> global jax.Arrays sharded on the batch axis by `batch_spec`.

    `batch_spec` shards dim 0 (e.g. PartitionSpec(("data", "fsdp"))); other dims replicate.
    """
    sharding = NamedSharding(mesh, batch_spec)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
