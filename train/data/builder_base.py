"""Base for strata's tfds builders: local files in, array_record out, never a download."""

from __future__ import annotations

import sys

import tensorflow_datasets as tfds
from etils import epath

_DOWNLOAD_CONFIG = dict(
    # Feature statistics would need TensorFlow and are unused here.
    compute_stats=tfds.download.ComputeStatsMode.SKIP,
)


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """GeneratorBasedBuilder over local files, stored as array_record (read without TF).

    Not registered in tfds' global registry: these builders are constructed directly, and
    registering would collide with tfds' own names (tfds has an unrelated `wordnet`).
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

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
