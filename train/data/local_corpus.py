"""The user's own corpus (.txt / .jsonl files) as a tfds dataset.

* `.txt`: one document per line; empty lines are skipped; unlabelled.
* `.jsonl`: one JSON object per line; the document is `obj[text_key]`; the corpus is labelled
  when the first record of the first .jsonl file has `label_key`, and then every record must.
  Labels may be ints (class i -> name "i", names "0".."max") or strings (names sorted).

Splits: there are no per-split files. Every document goes to train/validation/test by md5 of
its text (98/1/1), so duplicates never straddle splits and adding files never moves old
documents between splits. A split that gets no document (tiny corpora) is not written;
loading it raises an error saying so.

Cache: built into `<data_dir>/local_corpus/<local_name>-<fingerprint>/1.0.0`. The fingerprint
hashes the files' bytes (in order), their kinds and the text/label keys, so two corpora never
collide and editing a file rebuilds instead of serving stale data.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from train.data.builder_base import LocalBuilder

log = logging.getLogger("strata")

SPLIT_PERCENT = {"train": (0, 98), "validation": (98, 99), "test": (99, 100)}
SUFFIXES = (".txt", ".jsonl")
_FINGERPRINT_CHARS = 16


def split_of(text: str) -> str:
    """Stable split of a document by md5 of its text."""
    bucket = int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % 100
    for name, (lo, hi) in SPLIT_PERCENT.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError(bucket)


@dataclasses.dataclass(eq=False)
class LocalCorpusConfig(tfds.core.BuilderConfig):
    files: tuple[str, ...] = ()
    text_key: str = "text"
    label_key: str = "label"
    labelled: bool = False


def _check_files(files: Sequence[str]) -> list[Path]:
    if not files:
        raise ValueError('config.data.local_files is empty; source="local" needs .txt/.jsonl files')
    paths = []
    for f in files:
        p = Path(f).expanduser().resolve()
        if p.suffix not in SUFFIXES:
            raise ValueError(
                f"Local corpus file {str(p)!r}: expected a {' or '.join(SUFFIXES)} file"
            )
        if not p.is_file():
            raise FileNotFoundError(
                f"Local corpus file {str(p)!r} (config.data.local_files) not found"
            )
        paths.append(p)
    return paths


def _hash_utf8_text(path: Path, h) -> bool:
    """Feeds the file's bytes to `h`, checking they are UTF-8; -> whether any line is
    non-blank. Raises ValueError naming the file and the offset of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines, content = 0, 1, False
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            try:
                content |= bool(decoder.decode(chunk, final=not chunk).strip())
            except UnicodeDecodeError as e:
                # e.object is the decoder's held-back bytes (a split character) + chunk.
                bad = offset - (len(e.object) - len(chunk)) + e.start
                line = lines + e.object[: e.start].count(b"\n") - (
                    e.object[: len(e.object) - len(chunk)].count(b"\n"))
                raise ValueError(
                    f"{path}: not UTF-8 text: byte 0x{e.object[e.start]:02x} at byte offset "
                    f"{bad} (line {line}): {e.reason}. Local corpus files "
                    f"(config.data.local_files) must be UTF-8 encoded; convert it, e.g. "
                    f"`iconv -f latin1 -t utf-8`") from None
            if not chunk:
                return content
            h.update(chunk)
            offset += len(chunk)
            lines += chunk.count(b"\n")


def _first_jsonl_record(path: Path) -> tuple[int, dict] | None:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                return lineno, _parse_json(line, path, lineno)
    return None


def _parse_json(line: str, path: Path, lineno: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def make_config(
    files: Sequence[str], name: str = "", text_key: str = "text", label_key: str = "label"
) -> LocalCorpusConfig:
    """Config for `LocalCorpus` naming the build by `name` + content fingerprint.

    Reads every file once (hashing is fast; a changed file must change the cache key).
    """
    paths = _check_files(files)
    h = hashlib.sha256(json.dumps([text_key, label_key]).encode())
    empty = []
    for p in paths:
        h.update(p.suffix.encode() + b"\0")
        if not _hash_utf8_text(p, h):
            empty.append(str(p))
        h.update(b"\0file\0")
    if len(empty) == len(paths):
        raise ValueError(
            f"config.data.local_files: no non-empty line/record found in {empty}; a local "
            f"corpus needs at least one document (one per line of a .txt file, one JSON "
            f"object per line of a .jsonl file; blank lines are skipped)")
    for p in empty:
        log.warning("Local corpus file %s (config.data.local_files) has no non-empty line; "
                    "it adds no document", p)
    labelled = False
    for p in paths:
        if p.suffix == ".jsonl" and (first := _first_jsonl_record(p)) is not None:
            labelled = label_key in first[1]
            break
    safe = re.sub(r"[^A-Za-z0-9_.]+", "_", name or "local").strip("_") or "local"
    return LocalCorpusConfig(
        name=f"{safe}-{h.hexdigest()[:_FINGERPRINT_CHARS]}",
        description=f"Local corpus {name!r} from {[str(p) for p in paths]}",
        files=tuple(str(p) for p in paths),
        text_key=text_key,
        label_key=label_key,
        labelled=labelled,
    )


def read_documents(config: LocalCorpusConfig) -> Iterator[tuple[str, str, object]]:
    """Yields (key, text, raw label or None) over all files, validating every record."""
    for i, f in enumerate(config.files):
        path = Path(f)
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                key = f"{i}:{lineno}"
                if path.suffix == ".txt":
                    if config.labelled:
                        raise ValueError(
                            f"{path}: .txt documents have no label, but the corpus is labelled "
                            f"(its .jsonl records have {config.label_key!r}); use .jsonl files"
                        )
                    yield key, line.rstrip("\r\n"), None
                    continue
                obj = _parse_json(line, path, lineno)
                if config.text_key not in obj:
                    raise KeyError(
                        f"{path}:{lineno}: missing text field {config.text_key!r} "
                        f"(config.data.text_key); record keys: {sorted(obj)}"
                    )
                text = obj[config.text_key]
                if not isinstance(text, str):
                    raise ValueError(
                        f"{path}:{lineno}: field {config.text_key!r} must be a string, "
                        f"got {type(text).__name__}"
                    )
                label = None
                if config.labelled:
                    if config.label_key not in obj:
                        raise KeyError(
                            f"{path}:{lineno}: missing label field {config.label_key!r} "
                            f"(config.data.label_key); the corpus is labelled because earlier "
                            "records have it"
                        )
                    label = obj[config.label_key]
                    if isinstance(label, bool) or not isinstance(label, int | str):
                        raise ValueError(
                            f"{path}:{lineno}: label {config.label_key!r} must be an int or a "
                            f"string, got {label!r}"
                        )
                    if isinstance(label, int) and label < 0:
                        raise ValueError(f"{path}:{lineno}: negative label {label}")
                yield key, text, label


def label_vocab(labels: Sequence[object]) -> list[str]:
    """Class names: ints -> "0".."max" (the int is the class id); strings -> sorted."""
    kinds = {type(x) for x in labels}
    if kinds == {int}:
        return [str(i) for i in range(max(labels) + 1)]
    if kinds == {str}:
        return sorted(set(labels))
    raise ValueError(f"Labels mix ints and strings ({sorted(map(str, kinds))}); use one kind")


class LocalCorpus(LocalBuilder, skip_registration=True):
    """Documents from local files: `text` (str) and, if labelled, `label` (ClassLabel)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Local .txt/.jsonl corpus, md5(text) 98/1/1 split."}

    def __init__(self, *, config: LocalCorpusConfig, **kwargs):
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"text": tfds.features.Text()}
        if self.builder_config.labelled:
            # Names are set in _split_generators (after a scan), restored from disk on reload.
            features["label"] = tfds.features.ClassLabel()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("text", "label") if self.builder_config.labelled else None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Local files only.
        docs = list(read_documents(self.builder_config))
        if not docs:  # Only Unicode whitespace (make_config checks ASCII whitespace).
            raise ValueError(
                f"config.data.local_files: no non-empty line/record found in "
                f"{list(self.builder_config.files)}")
        class_ids = None
        if self.builder_config.labelled:
            names = label_vocab([label for _, _, label in docs])
            self.info.features["label"].names = names
            class_ids = {n: i for i, n in enumerate(names)}
        by_split = {split: [] for split in SPLIT_PERCENT}
        for key, text, label in docs:
            example = {"text": text}
            if class_ids is not None:
                example["label"] = label if isinstance(label, int) else class_ids[label]
            by_split[split_of(text)].append((key, example))
        # tfds cannot write an empty split; a tiny corpus may have no validation/test docs.
        return {split: self._generate_examples(exs) for split, exs in by_split.items() if exs}

    def _generate_examples(self, examples):
        yield from examples
