"""Small, fast data fixtures."""

from __future__ import annotations

import pytest
from data_helpers import make_texts


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A ~200-piece tokenizer over `make_texts` vocabulary (trains in <1 s)."""
    from train.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tiny.model"
    return train_tokenizer(make_texts(2000, seed=1), path, vocab_size=300)
