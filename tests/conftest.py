"""Shared fixtures.

`wordnet_data_dir`: a tfds data dir holding the full WordNet 3.0 dataset, built once per
session. The build is tfds' pure-Python serialisation of ~118k synsets (~40 s on 2 cores),
so it starts in a subprocess right after collection and the tests that need it run last:
the rest of the suite overlaps with the build instead of waiting for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORDNET_DIR = Path(os.environ.get("WORDNET_DIR") or "/usr/share/wordnet")
_FIXTURE = "wordnet_data_dir"
_BUILD = (
    "import sys, tensorflow_datasets as tfds\n"
    "from train.data.wordnet import Wordnet\n"
    "tfds.disable_progress_bar()\n"
    "Wordnet(wordnet_dir=sys.argv[1], data_dir=sys.argv[2]).prepare()\n"
)
_build: dict = {}  # proc, data_dir, log.


def _have_wordnet() -> bool:
    return all((WORDNET_DIR / f"data.{p}").is_file() for p in ("noun", "verb", "adj", "adv"))


def pytest_collection_modifyitems(session, config, items):
    # The minute-long end-to-end tests (marked slow) first in each group: started early,
    # they overlap the short ones instead of ending the session with one worker idle.
    items.sort(key=lambda it: it.get_closest_marker("slow") is None)  # Stable.
    users = [it for it in items if _FIXTURE in getattr(it, "fixturenames", ())]
    if not users or not _have_wordnet() or config.option.collectonly:
        return
    items[:] = [it for it in items if it not in users] + users  # Overlap, then use.
    data_dir = tempfile.mkdtemp(prefix="strata-wordnet-tfds-")
    _start_build(data_dir)


def _start_build(data_dir: str) -> None:
    log = open(Path(data_dir) / "build.log", "w+")  # Closed at session end.
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUILD, str(WORDNET_DIR), data_dir],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    _build.update(proc=proc, data_dir=data_dir, log=log)


def pytest_sessionfinish(session, exitstatus):
    if not _build:
        return
    if _build["proc"].poll() is None:
        _build["proc"].kill()
        _build["proc"].wait()
    _build["log"].close()
    shutil.rmtree(_build["data_dir"], ignore_errors=True)


@pytest.fixture(scope="session")
def wordnet_files_dir() -> Path:
    """The real WordNet 3.0 files (Debian `wordnet-base`, which launch/setup.sh installs)."""
    if not _have_wordnet():
        pytest.fail(f"WordNet files not in {WORDNET_DIR}: apt-get install wordnet-base "
                    f"(or set WORDNET_DIR)")
    return WORDNET_DIR


@pytest.fixture(scope="session")
def wordnet_data_dir(wordnet_files_dir) -> str:
    """tfds data dir with the prepared full WordNet dataset (read-only for tests)."""
    if not _build:  # Not started at collection (requested indirectly): build now.
        _start_build(tempfile.mkdtemp(prefix="strata-wordnet-tfds-"))
    if _build["proc"].wait(timeout=900) != 0:
        _build["log"].seek(0)
        pytest.fail(f"Building WordNet failed:\n{_build['log'].read()[-4000:]}")
    return _build["data_dir"]
