r"""Export a strata run as a Hugging Face BERT directory (BertModel.from_pretrained loads it).

  python -m launch.export --workdir runs/ft_lora --output exported/ft_lora

Writes `model.safetensors` (BertModel names, torch layout), `config.json` and the run's
WordPiece `vocab.txt` (a sentencepiece run gets its `.model` copied as `spiece.model`:
BERT tokenizers cannot read it). Which fine-tuning methods export is the table's `merges`
(model/finetune_methods.py): LoRA and (IA)^3 are merged into the base weights first;
prompt/prefix tuning and adapters add computation BERT lacks: an error, before the
checkpoint is read. The classifier
layer is dropped (BertModel has none); the pooler is kept.

--output may not be, hold, or lie inside the run (or its tokenizer file): refused before
anything is read. It is written whole or not at all (a temporary sibling renamed into
place, 0644 files in a 0755 directory); an existing non-empty one is only replaced with
--overwrite, and deleted only after the new export is in place.
"""

import json
import os
import shutil
import sys

import jax
import ml_collections
from absl import app, flags

from model import finetune_methods, hf_bert
from train.safe_output import UnsafeOutputError


def define_flags():
    """Defined only when run as a program: tests import `export` beside other entry
    points' flags of the same names."""
    flags.DEFINE_string("workdir", None, "strata run directory to export.")
    flags.DEFINE_string("output", None, "Directory to write (HF BERT layout).")
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output.")
    flags.mark_flags_as_required(["workdir", "output"])


def export(workdir, output, overwrite=False):
    """Exports `workdir`'s latest checkpoint to `output`; returns `output`."""
    from train import embedding, safe_output
    from train.data import tokenizer as tokenizers
    from train.init_from import load_params

    output = os.path.abspath(output)
    # Before reading anything: a mistaken --output must not cost the run.
    safe_output.check_output_apart(output, [("--workdir", workdir)])
    safe_output.check_output_dir(output, overwrite)
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    methods = [finetune_methods.METHODS[m] for m in finetune_methods.active(config.model)]
    refuse_unmergeable(methods, config.model)
    if config.data.get("tokenizer", "sentencepiece") == "wordpiece":
        tokenizer_file = tokenizers.wordpiece_vocab_path(config.data.tokenizer_path)
        copy_as = hf_bert.VOCAB
    elif tokenizers.tokenizer_path(config.data).is_file():  # Never trains one here.
        tokenizer_file, copy_as = tokenizers.tokenizer_path(config.data), "spiece.model"
    else:
        tokenizer_file = None
    if tokenizer_file is not None:
        safe_output.check_output_apart(output, [("the --workdir's tokenizer", tokenizer_file)])
    flat, _ = load_params(workdir)
    params = hf_bert.merge_peft(embedding.unflatten(flat), config.model)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    merged_cfg = config.model.to_dict()
    for method in methods:  # Merged into the base weights: the plain model's fields.
        merged_cfg.update(method.off)

    with safe_output.staged_dir(output, overwrite) as staging:
        hf_bert.save(staging, flat, merged_cfg)
        if tokenizer_file is not None:
            shutil.copy(tokenizer_file, os.path.join(staging, copy_as))
    return output


def refuse_unmergeable(methods, model_cfg):
    """HfCheckpointError naming the fields of the first of `methods` (table entries)
    whose parameters cannot become plain BERT weights."""
    for method in methods:
        if not method.merges:
            fields = ", ".join(f"config.model.{k}={model_cfg[k]}" for k in method.off)
            exportable = [m.name for m in finetune_methods.METHODS.values() if m.merges]
            raise hf_bert.HfCheckpointError(
                f"{fields} ({method.name}): its parameters add computation BertModel does "
                f"not have and cannot be merged into the base weights; export a "
                f"{', '.join(exportable)} run")


def main(argv):
    del argv
    try:
        output = export(flags.FLAGS.workdir, flags.FLAGS.output, flags.FLAGS.overwrite)
    except (FileExistsError, FileNotFoundError, NotADirectoryError, UnsafeOutputError,
            hf_bert.HfCheckpointError) as error:
        sys.exit(f"FATAL: {error}")
    print(f"wrote {output}: {sorted(os.listdir(output))}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
