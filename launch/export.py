r"""Export a strata run as a Hugging Face BERT directory (BertModel.from_pretrained loads it).

  python -m launch.export --workdir runs/ft_lora --output exported/ft_lora

Writes `model.safetensors` (BertModel names, torch layout), `config.json` and the run's
WordPiece `vocab.txt` (a sentencepiece run gets its `.model` copied as `spiece.model`:
BERT tokenizers cannot read it). LoRA and (IA)^3 are merged into the base weights first;
prompt/prefix tuning and adapters add computation BERT lacks: an error. The classifier
layer is dropped (BertModel has none); the pooler is kept. The output directory is written
whole or not at all (a temp directory renamed at the end) and an existing non-empty one
is only replaced with --overwrite.
"""

import json
import os
import shutil
import sys
import tempfile

import jax
import ml_collections
from absl import app, flags

from model import hf_bert


def define_flags():
    """Defined only when run as a program: tests import `export` beside other entry
    points' flags of the same names."""
    flags.DEFINE_string("workdir", None, "strata run directory to export.")
    flags.DEFINE_string("output", None, "Directory to write (HF BERT layout).")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output.")
    flags.mark_flags_as_required(["workdir", "output"])


def export(workdir, output, overwrite=False):
    """Exports `workdir`'s latest checkpoint to `output`; returns `output`."""
    from train import embedding
    from train.data import tokenizer as tokenizers
    from train.init_from import load_params

    output = os.path.abspath(output)
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise FileExistsError(f"--output {output} exists and is not empty; pass --overwrite "
                              f"to replace it")
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    flat, _ = load_params(workdir)
    params = hf_bert.merge_peft(embedding.unflatten(flat), config.model)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    merged_cfg = config.model.to_dict()
    merged_cfg.update(lora_rank=0, ia3=False)

    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", dir=parent)
    try:
        hf_bert.save(staging, flat, merged_cfg)
        if config.data.get("tokenizer", "sentencepiece") == "wordpiece":
            vocab = tokenizers.wordpiece_vocab_path(config.data.tokenizer_path)
            shutil.copy(vocab, os.path.join(staging, hf_bert.VOCAB))
        elif tokenizers.tokenizer_path(config.data).is_file():  # Never trains one here.
            shutil.copy(tokenizers.tokenizer_path(config.data),
                        os.path.join(staging, "spiece.model"))
        if os.path.exists(output):  # Only here with --overwrite (or an empty directory).
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)
    return output


def main(argv):
    del argv
    try:
        output = export(flags.FLAGS.workdir, flags.FLAGS.output, flags.FLAGS.overwrite)
    except (FileExistsError, FileNotFoundError, hf_bert.HfCheckpointError) as error:
        sys.exit(f"FATAL: {error}")
    print(f"wrote {output}: {sorted(os.listdir(output))}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
