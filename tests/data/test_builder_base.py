"""LocalBuilder: a builder over an unprepared data dir leaves no temp dirs behind."""

from __future__ import annotations

import tempfile

from train.data.wordnet import Wordnet


def test_constructing_a_builder_leaks_no_temp_dir(tmp_path, monkeypatch):
    """tfds' constructor looks for pre-computed info in its GCS bucket through an empty
    `tempfile.mkdtemp("tfds")` it never removed (hundreds of /tmp/tmp*tfds after CI runs)."""
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))  # Where mkdtemp would land.
    b = Wordnet(wordnet_dir=tmp_path, data_dir=tmp_path / "data")
    assert not b.info.splits  # Unprepared: the bucket path was the one taken.
    assert [p.name for p in temp_root.iterdir()] == []
