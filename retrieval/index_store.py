"""Saving and loading indexes: our own files, written atomically, read without pickle.

An index directory holds:

    index.json       format, kind, dim, count, config, ScaNN plan, build recall, the
                     encoder fingerprint and where the passage texts are
    ids.json         [n] document ids (str), the row order of vectors.npy
    vectors.npy      float32 [n, dim]
    passages.jsonl   optional: {"id": ..., "text": ...} per line, in ids order
    scann/           kind "scann": ScaNN's assets, serialised *without* docids
    shards/00000/    kind "sharded": one such directory per shard (no passages there)

ScaNN's own serializer pickles docids, and unpickling runs arbitrary code, so ids live
in ids.json and loading refuses any *.pkl / *.pickle file. A save writes a temp
directory beside the target and renames it into place: an existing index is replaced
only once the new one is complete.
"""

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from retrieval import vectors as vec
from retrieval.doc_table import DocTable
from retrieval.exact import ExactIndex
from retrieval.index import resolve_kind
from retrieval.index_config import IndexConfig
from retrieval.scann_index import ScannIndex, scann_ops
from retrieval.sharded import ShardedIndex

log = logging.getLogger("strata")

FORMAT = "strata-index/1"
_PICKLE_SUFFIXES = (".pkl", ".pickle")


class CorruptIndexError(ValueError):
    """An index directory that is incomplete or inconsistent."""


@dataclasses.dataclass
class SavedIndex:
    """What `load_index` returns: the index and the metadata saved with it."""

    index: object  # ExactIndex | ScannIndex | ShardedIndex.
    encoder_fingerprint: str
    passages: dict[str, str] | None  # id -> text, when the texts were saved.
    passages_source: dict | None  # A pointer such as {"tfds": "wordnet", "split": "train"}.
    meta: dict


def encoder_fingerprint(params) -> str:
    """"sha256:<hex>" over every leaf's path, dtype, shape and bytes of a params tree.

    Leaves must be fully addressable (on a pod: gather or replicate the encoder first).
    """
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}\0{array.dtype}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()


# --- Save -------------------------------------------------------------------------------

def save_index(path, index, *, encoder_fingerprint: str, passages=None,
               passages_source: Mapping | None = None) -> None:
    """Writes `index` to directory `path`, replacing an index there only when complete.

    passages: texts as {id: text} or a sequence aligned with `index.ids`; every id needs
    one. passages_source: a JSON-able pointer to where the texts live instead.
    """
    if not isinstance(encoder_fingerprint, str) or not encoder_fingerprint:
        raise ValueError("save_index needs the encoder fingerprint (a non-empty str; see "
                         "encoder_fingerprint(params))")
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "index.json")):
        raise ValueError(f"{path} exists and is not an index directory; not replacing it")
    texts = _check_passages(passages, index.ids)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        meta = _write_part(tmp, index)
        meta["encoder_fingerprint"] = encoder_fingerprint
        meta["passages_source"] = dict(passages_source) if passages_source else None
        meta["passages_file"] = None
        if texts is not None:
            with open(os.path.join(tmp, "passages.jsonl"), "w") as f:
                for doc_id in index.ids:
                    f.write(json.dumps({"id": doc_id, "text": texts[doc_id]}) + "\n")
            meta["passages_file"] = "passages.jsonl"
        _write_json(os.path.join(tmp, "index.json"), meta)  # Last: marks the dir complete.
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_part(directory, index) -> dict:
    meta = dict(format=FORMAT, kind=index.kind, dim=index.dim, count=len(index),
                config=index.config.to_dict())
    if index.kind == "sharded":
        meta["shards"] = []
        for number, shard in enumerate(index.shards):
            sub = os.path.join("shards", f"{number:05d}")
            os.makedirs(os.path.join(directory, sub))
            _write_json(os.path.join(directory, sub, "index.json"),
                        _write_part(os.path.join(directory, sub), shard))
            meta["shards"].append(sub)
        return meta
    _write_json(os.path.join(directory, "ids.json"), index.ids)
    np.save(os.path.join(directory, "vectors.npy"), index.vectors, allow_pickle=False)
    if index.kind == "scann":
        meta.update(plan=index.plan, build_recall=index.build_recall)
        os.makedirs(os.path.join(directory, "scann"))
        index.searcher.serialize(os.path.join(directory, "scann"), True)  # Relative paths.
    return meta


def _swap_into_place(tmp, path):
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    parent, name = os.path.split(path)
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rename(path, os.path.join(old, name))  # The good index stays whole until...
    os.rename(tmp, path)  # ...the new one, complete, takes its name.
    # A crash between the two renames leaves the old index whole in `old`, not half-written.
    shutil.rmtree(old)


def _write_json(file, value):
    with open(file, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())


def _check_passages(passages, ids) -> dict[str, str] | None:
    if passages is None:
        return None
    if isinstance(passages, Mapping):
        texts = dict(passages)
    elif isinstance(passages, Sequence | np.ndarray) and not isinstance(passages, str):
        passages = [str(text) for text in passages]
        if len(passages) != len(ids):
            raise ValueError(f"{len(passages)} passages for {len(ids)} indexed documents")
        texts = dict(zip(ids, passages))
    else:
        raise ValueError(f"passages must be {{id: text}} or a list, got {type(passages)}")
    missing = [doc_id for doc_id in ids if doc_id not in texts]
    if missing:
        raise ValueError(f"No passage text for {len(missing)} ids, e.g. {missing[:3]}")
    return texts


# --- Load -------------------------------------------------------------------------------

def load_index(path, *, expected_fingerprint: str | None) -> SavedIndex:
    """Reads an index saved by `save_index`; never unpickles.

    expected_fingerprint: the current encoder's `encoder_fingerprint(params)`; a
    different saved one is an error (the vectors came from another encoder). None skips
    the check, deliberately.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No index directory at {path}")
    for root, _, files in os.walk(path):
        pickled = [f for f in files if f.lower().endswith(_PICKLE_SUFFIXES)]
        if pickled:
            raise ValueError(f"Refusing to load {path}: it holds pickle file(s) "
                             f"{os.path.join(root, pickled[0])} and loading must never "
                             f"unpickle (it can run arbitrary code); remove them")
    meta = _read_json(path, "index.json")
    saved = meta.get("encoder_fingerprint")
    if expected_fingerprint is not None and saved != expected_fingerprint:
        raise ValueError(f"Index {path} was built with encoder {saved!r}, but the current "
                         f"encoder is {expected_fingerprint!r}: re-embed the corpus")
    index = _read_part(path, meta)
    passages = None
    if meta.get("passages_file"):
        passages = _read_passages(path, meta["passages_file"], index.ids)
    return SavedIndex(index=index, encoder_fingerprint=saved, passages=passages,
                      passages_source=meta.get("passages_source"), meta=meta)


def _read_part(directory, meta):
    if meta.get("format") != FORMAT:
        raise CorruptIndexError(f"{directory}/index.json: format {meta.get('format')!r}, "
                                f"expected {FORMAT!r}")
    try:
        kind, dim, count = meta["kind"], int(meta["dim"]), int(meta["count"])
        config = IndexConfig.from_config(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptIndexError(f"{directory}/index.json is incomplete: {e!r}") from e
    if kind == "sharded":
        shards = []
        for sub in meta.get("shards") or []:
            sub_dir = _inside(directory, sub)
            shards.append(_read_part(sub_dir, _read_json(sub_dir, "index.json")))
        index = ShardedIndex(shards)
    else:
        ids = _read_json(directory, "ids.json")
        vectors = _read_npy(directory, "vectors.npy")
        try:
            ids = vec.check_ids(ids, what=f"{directory}/ids.json")
            vectors = vec.check_vectors(vectors, f"{directory}/vectors.npy", dim=dim)
        except ValueError as e:
            raise CorruptIndexError(str(e)) from e
        if vectors.shape[0] != len(ids):
            raise CorruptIndexError(f"{directory}: vectors.npy has {vectors.shape[0]} rows "
                                    f"but ids.json {len(ids)} ids")
        if kind == "scann" and resolve_kind(config) == "scann":
            index = _read_scann(directory, meta, vectors, ids, config)
        elif kind in ("scann", "exact"):
            index = ExactIndex(vectors, ids, config)
        else:
            raise CorruptIndexError(f"{directory}/index.json: unknown index kind {kind!r}")
    if len(index) != count or index.dim != dim:
        raise CorruptIndexError(f"{directory}: holds {len(index)} x {index.dim} vectors, "
                                f"index.json says {count} x {dim}")
    return index


def _read_scann(directory, meta, vectors, ids, config):
    scann_dir = os.path.join(directory, "scann")
    with _open(scann_dir, "scann_assets.pbtxt") as f:
        assets = f.read()
    for asset in re.findall(r'asset_path:\s*"([^"]*)"', assets):
        asset_file = _inside(scann_dir, asset)
        if not os.path.isfile(asset_file):
            raise CorruptIndexError(f"{scann_dir}: ScaNN asset {asset!r} is missing")
        if asset.endswith(".npy"):  # Row counts must match ours, or rows map to wrong ids.
            rows = _read_npy(scann_dir, asset, mmap=True).shape[0]
            if rows != len(ids):
                raise CorruptIndexError(f"{asset_file} has {rows} rows, ids.json {len(ids)}")
    try:
        searcher = scann_ops().scann_pybind.ScannNumpy(scann_dir, assets)
    except RuntimeError as e:  # ScaNN's own checks, e.g. a missing scann_config.pb.
        raise CorruptIndexError(f"{scann_dir}: ScaNN could not load it: {e}") from e
    if searcher.size() != len(ids):
        raise CorruptIndexError(f"{scann_dir} holds {searcher.size()} vectors, ids.json "
                                f"{len(ids)}")
    index = ScannIndex(searcher, DocTable(vectors, ids), config, meta.get("plan") or {})
    index.build_recall = meta.get("build_recall")
    return index


def _read_passages(directory, name, ids) -> dict[str, str]:
    texts = {}
    with _open(directory, name) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                texts[record["id"]] = record["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise CorruptIndexError(f"{directory}/{name} line {number}: {e!r}") from e
    if set(texts) != set(ids):
        raise CorruptIndexError(f"{directory}/{name} holds texts for {len(texts)} ids, "
                                f"not the index's {len(ids)}")
    return texts


def _inside(directory, name) -> str:
    """directory/name, refusing names that climb out of the index directory."""
    full = os.path.realpath(os.path.join(directory, name))
    if not full.startswith(os.path.realpath(directory) + os.sep):
        raise CorruptIndexError(f"{directory}: path {name!r} points outside the index")
    return full


def _open(directory, name):
    try:
        return open(_inside(directory, name))
    except FileNotFoundError as e:
        raise CorruptIndexError(f"{directory}: missing {name}") from e


def _read_json(directory, name):
    with _open(directory, name) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise CorruptIndexError(f"{directory}/{name} is not valid JSON: {e}") from e


def _read_npy(directory, name, mmap=False) -> np.ndarray:
    file = _inside(directory, name)
    if not os.path.isfile(file):
        raise CorruptIndexError(f"{directory}: missing {name}")
    try:
        return np.load(file, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:  # Object arrays (pickle) land here too.
        raise CorruptIndexError(f"{file} is not a readable .npy array: {e}") from e
