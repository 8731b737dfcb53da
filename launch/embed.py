r"""Sentence embeddings for a text file: one L2-normalised mean-pooled vector per line.

  python -m launch.embed --init_from hf:minilm --input texts.txt --output vectors.npy
  python -m launch.embed --init_from runs/ft_lora --input texts.txt --output vectors.npy

`--init_from`: `hf:minilm`, `hf:<HF BERT directory>` or a strata workdir (its latest
checkpoint, config and tokenizer). Writes float32 [lines, hidden] with `np.save` (`.npy`
appended to a name without it), whole or not at all: a temporary sibling renamed over
--output. --output may not be --input, nor lie inside the run or HF directory it reads
(refused before anything is computed). Texts are batched by length (train/embedding.py),
jit-compiled once per length bucket.
"""

import logging
import os
import sys

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


def encoder_dir(init_from):
    """-> the directory `--init_from` reads: a strata workdir or an HF BERT directory."""
    from model import hf_bert

    return hf_bert.resolve_dir(init_from) if init_from.startswith("hf:") else init_from


def checked_output(output, input_path, init_from):
    """-> the .npy path to write; refuses one that would replace or enter an input."""
    from train import safe_output

    output = output if output.endswith(".npy") else f"{output}.npy"  # np.save's rule.
    safe_output.check_output_apart(output, [("--input", input_path),
                                            ("--init_from", encoder_dir(init_from))])
    safe_output.check_output_file(output)
    return output


def main(argv):
    del argv
    logging.getLogger("strata").setLevel(logging.INFO)
    try:  # Before the (slow) imports and the encoder: bad paths fail at once.
        texts = read_lines(_INPUT.value)
        output = checked_output(_OUTPUT.value, _INPUT.value, _INIT_FROM.value)
    except (OSError, ValueError) as error:
        sys.exit(f"FATAL: {error}")
    from train import embedding, safe_output
    params, model, tokenizer, max_len = embedding.load_encoder(_INIT_FROM.value)
    max_len = _MAX_LEN.value or max_len

    def progress(done, elapsed):
        print(f"\r{done:,}/{len(texts):,} passages, {done / max(elapsed, 1e-9):,.1f} "
              f"passages/s", end="", file=sys.stderr, flush=True)

    vectors = embedding.embed_texts(params, model, tokenizer, texts, _BATCH_SIZE.value,
                                    max_len, progress=progress)
    print(file=sys.stderr)
    safe_output.atomic_save_npy(output, vectors)
    print(f"wrote {output}: {vectors.shape[0]} x {vectors.shape[1]} float32")


if __name__ == "__main__":
    app.run(main)
