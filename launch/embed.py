r"""Sentence embeddings for a text file: one L2-normalised mean-pooled vector per line.

  python -m launch.embed --init_from hf:minilm --input texts.txt --output vectors.npy
  python -m launch.embed --init_from runs/ft_lora --input texts.txt --output vectors.npy

`--init_from`: `hf:minilm`, `hf:<HF BERT directory>` or a strata workdir (its latest
checkpoint, config and tokenizer). Writes float32 [lines, hidden] with `np.save`. Texts are
batched by length (train/embedding.py), jit-compiled once per length bucket.
"""

import logging
import os
import sys

import numpy as np
from absl import app, flags

_INIT_FROM = flags.DEFINE_string("init_from", None, "hf:minilm | hf:<dir> | strata workdir.")
_INPUT = flags.DEFINE_string("input", None, "UTF-8 text file, one passage per line.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the vectors (.npy).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Passages per compiled batch.")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "Pieces per passage incl. [CLS]/[SEP]; 0: the "
                                "checkpoint's own (256 for MiniLM, a run's data.seq_len).")
flags.mark_flags_as_required(["init_from", "input", "output"])


def read_lines(path):
    """-> the file's lines; fails naming the first empty line (it has no embedding)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"--input {path!r} line {number} is empty: every line must be a "
                             f"passage (one vector per line)")
    if not lines:
        raise ValueError(f"--input {path!r} is empty")
    return lines


def main(argv):
    del argv
    from train import embedding

    logging.getLogger("strata").setLevel(logging.INFO)
    try:
        texts = read_lines(_INPUT.value)
    except (OSError, ValueError) as error:
        sys.exit(f"FATAL: {error}")
    params, model, tokenizer, max_len = embedding.load_encoder(_INIT_FROM.value)
    max_len = _MAX_LEN.value or max_len

    def progress(done, elapsed):
        print(f"\r{done:,}/{len(texts):,} passages, {done / max(elapsed, 1e-9):,.1f} "
              f"passages/s", end="", file=sys.stderr, flush=True)

    vectors = embedding.embed_texts(params, model, tokenizer, texts, _BATCH_SIZE.value,
                                    max_len, progress=progress)
    print(file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    np.save(_OUTPUT.value, vectors)
    print(f"wrote {_OUTPUT.value}: {vectors.shape[0]} x {vectors.shape[1]} float32")


if __name__ == "__main__":
    app.run(main)
