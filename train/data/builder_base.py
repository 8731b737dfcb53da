"""Base for strata's tfds builders: local files in, array_record out, never a download."""

from __future__ import annotations

import sys

import tensorflow_datasets as tfds
from etils import epath

_DOWNLOAD_CONFIG = dict(
    # Feature statistics would need TensorFlow and are unused here.
    compute_stats=tfds.download.ComputeStatsMode.SKIP,
)


def _no_bucket_info() -> None:
    """Local datasets have no pre-computed info in tfds' GCS bucket."""


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """GeneratorBasedBuilder over local files, stored as array_record (read without TF).

    Not registered in tfds' global registry: these builders are constructed directly, and
    registering would collide with tfds' own names (tfds has an unrelated `wordnet`).
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @property
    def info(self) -> tfds.core.DatasetInfo:
        info = super().info  # Cached per builder by tfds.
        # Before the data dir holds a dataset_info.json, tfds' constructor calls
        # `info.initialize_from_bucket()`, which makes an empty `tempfile.mkdtemp("tfds")`
        # (/tmp/tmp*tfds) before looking for pre-computed info in gs://tfds-data, and never
        # removes it: one leaked directory per builder over an unprepared data dir. These
        # datasets are local, never in that bucket, so there is nothing to initialize from.
        info.initialize_from_bucket = _no_bucket_info
        return info

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' default resolves packages through `importlib_resources`, which is not
        # installed; the checksums file it is looking for is irrelevant without downloads.
        return epath.Path(sys.modules[cls.__module__].__file__)

    def prepare(self) -> LocalBuilder:
        """Builds into `data_dir` unless already there; returns self."""
        self.download_and_prepare(download_config=tfds.download.DownloadConfig(**_DOWNLOAD_CONFIG))
        return self
