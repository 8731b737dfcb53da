"""Fast random access to a prepared tfds array_record split, decoding only the fields used.

Why not `builder.as_data_source()` directly: it decodes every feature through tfds' generic
numpy decoder (~300 us/record) and reads single records via array_record's thread-pool path
(~500 us/record). Reading ranges and pulling the few needed fields out of the tf.Example
proto is ~40x faster, which matters because records are read on the host every step. Feature
types without a fast path (images, nested sequences, ...) fall back to tfds' own decoder.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.proto import tf_example_pb2

Example = dict[str, object]


def _lookup_feature(features, key: str):
    """`features["a/b"]` for nested FeaturesDicts; KeyError names the available keys."""
    node = features
    for part in key.split("/"):
        if not isinstance(node, tfds.features.FeaturesDict) or part not in node:
            available = sorted(_flat_keys(features))
            raise KeyError(f"Feature {key!r} not in dataset; available: {available}")
        node = node[part]
    return node


def _flat_keys(features, prefix=""):
    for k, v in features.items():
        if isinstance(v, tfds.features.FeaturesDict):
            yield from _flat_keys(v, f"{prefix}{k}/")
        else:
            yield prefix + k


def _to_python(x):
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "SO":
            return [_to_python(v) for v in x.tolist()]
        return x.item() if x.ndim == 0 else x
    if isinstance(x, np.generic):
        return x.item()
    return x


def _fast_decoder(feature, key: str) -> Callable | None:
    """Decoder from the tf.Example feature map, or None when tfds must decode."""
    scalar = tuple(feature.shape) == ()
    if isinstance(feature, tfds.features.Text):
        return lambda fm: fm[key].bytes_list.value[0].decode("utf-8")
    if isinstance(feature, tfds.features.Sequence) and isinstance(
        feature.feature, tfds.features.Text
    ):
        return lambda fm: [v.decode("utf-8") for v in fm[key].bytes_list.value]
    if isinstance(feature, tfds.features.Tensor) and scalar:
        kind = np.dtype(feature.np_dtype).kind
        if kind in "iub":
            return lambda fm: int(fm[key].int64_list.value[0])
        if kind == "f":
            return lambda fm: float(fm[key].float_list.value[0])
    return None


class TfdsSplit:
    """`len` + `[i]` over one prepared split: `{out_key: value}` for `fields`.

    Args:
      info: the builder's DatasetInfo (files and features).
      split: a split name, or any tfds split expression ("train[:10%]").
      fields: out_key -> feature key ("a/b" for nested), e.g. {"text": "review"}.
      labelled, label_names, name: carried for the pipeline (`label_names` None if unnamed).
    Values: str for Text, list[str] for Sequence(Text), int for ClassLabel / int scalars.
    """

    def __init__(
        self,
        info: tfds.core.DatasetInfo,
        split: str,
        fields: Mapping[str, str],
        *,
        labelled: bool = False,
        label_names: list[str] | None = None,
        name: str = "",
    ):
        self.labelled = labelled
        self.label_names = label_names
        self.name = name
        self._features = info.features
        self._files = [
            (fi.filename, fi.skip, fi.take) for fi in info.splits[split].file_instructions
        ]
        self._starts = np.cumsum([0] + [take for _, _, take in self._files]).tolist()
        self._fields = dict(fields)
        self._decoders = {}
        self._slow_keys = {}
        for out_key, key in self._fields.items():
            decoder = _fast_decoder(_lookup_feature(info.features, key), key)
            if decoder is None:
                self._slow_keys[out_key] = key
            else:
                self._decoders[out_key] = decoder
        self._local = threading.local()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> Example:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for split of {len(self)} records")
        f = bisect.bisect_right(self._starts, index) - 1
        pos = self._files[f][1] + index - self._starts[f]
        return self._decode(self._reader(f).read(pos, pos + 1)[0])

    def iter_range(
        self, start: int = 0, stop: int | None = None, *, keys=None, chunk: int = 4096
    ) -> Iterator[Example]:
        """Sequential scan (bulk reads), e.g. for tokenizer texts; `keys` limits the fields."""
        stop = len(self) if stop is None else min(stop, len(self))
        for f, (_, skip, take) in enumerate(self._files):
            lo, hi = max(start, self._starts[f]), min(stop, self._starts[f] + take)
            for a in range(lo, hi, chunk):
                b = min(a + chunk, hi)
                base = skip - self._starts[f]
                for record in self._reader(f).read(a + base, b + base):
                    yield self._decode(record, keys)

    def _decode(self, record: bytes, keys=None) -> Example:
        fm = tf_example_pb2.Example.FromString(record).features.feature
        out = {k: dec(fm) for k, dec in self._decoders.items() if keys is None or k in keys}
        slow = {k: v for k, v in self._slow_keys.items() if keys is None or k in keys}
        if slow:
            full = self._features.deserialize_example_np(record)
            for out_key, key in slow.items():
                node = full
                for part in key.split("/"):
                    node = node[part]
                out[out_key] = _to_python(node)
        return out

    def _reader(self, f: int):
        # One reader per thread and file: grain reads from many threads at once.
        readers = getattr(self._local, "readers", None)
        if readers is None:
            readers = self._local.readers = {}
        if f not in readers:
            readers[f] = array_record_module.ArrayRecordReader(
                self._files[f][0], "readahead_buffer_size:0"
            )
        return readers[f]

    def __getstate__(self):  # Picklable for grain worker processes: reopen files there.
        state = self.__dict__.copy()
        del state["_local"], state["_decoders"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()
        self._decoders = {
            k: _fast_decoder(_lookup_feature(self._features, key), key)
            for k, key in self._fields.items()
            if k not in self._slow_keys
        }


class Subset:
    """`source` restricted to `indices` (in the given order); keeps its attributes."""

    def __init__(self, source, indices: Sequence[int]):
        self._source = source
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Example:
        return self._source[int(self.indices[index])]

    def __getattr__(self, name):  # labelled, label_names, ... of the wrapped source.
        if name.startswith("__") or name in ("_source", "indices"):
            raise AttributeError(name)
        return getattr(self._source, name)


class WithExamples:
    """WordNet synsets as one document each: the gloss followed by its example sentences
    (`config.data.wordnet_text="gloss_and_examples"`, the MLM pre-training corpus)."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Example:
        example = dict(self._source[index])
        sentences = [e for e in example.pop("examples") if e]
        example["text"] = "; ".join([example["text"], *sentences])
        return example

    def __getattr__(self, name):  # labelled, label_names, ... of the wrapped source.
        if name.startswith("__") or name == "_source":
            raise AttributeError(name)
        return getattr(self._source, name)
