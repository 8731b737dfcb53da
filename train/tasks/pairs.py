"""(query, passage) pairs for contrastive retriever training (task "retriever").

An example is a dict {"question": str, "passage": str, "passage_id": str}: the passage
answers the question. A runner (retrieval/retriever_run.py) writes them as
`<data.qa_dir>/<split>.jsonl`. Both sides are `[CLS] pieces[:seq_len - 2] [SEP]` (the
truncation train/embedding.py embeds a corpus with), padded to seq_len.

Batch format (B rows, L = data_cfg.seq_len), row i a pair:
  tokens, segment_ids, positions                  int32   [B, L]  the queries
  passage_tokens, passage_segment_ids,
  passage_positions                               int32   [B, L]  their passages
  passage_key     int32   [B]  one value per distinct passage id: two questions about one
                               passage in a batch are not each other's negatives
  example_weight  float32 [B]  0 for eval's filler rows
"""

from __future__ import annotations

import hashlib

import grain
import numpy as np

from train.data import pipeline
from train.tasks import prefix_lm_examples as prefix_lm

# The files are read and written as prefix_lm's: one JSON example per line.
load_split = prefix_lm.load_split
write_split = prefix_lm.write_split


def passage_key(passage_id: str) -> int:
    """A stable int32 per passage id (md5; a collision only drops one negative)."""
    return int(hashlib.md5(passage_id.encode()).hexdigest()[:7], 16)


def _padded(rows, length: int, pad_id: int):
    tokens = np.full((len(rows), length), pad_id, np.int32)
    real = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        real[i, :len(row)] = True
    positions = np.where(real, np.arange(length)[None, :], 0).astype(np.int32)
    return tokens, real.astype(np.int32), positions


class EncodePairs(grain.transforms.Map):
    """A list of examples -> one batch dict (the module docstring's format)."""

    def __init__(self, tokenizer, seq_len: int):
        pipeline._check_seq_len(seq_len)
        self._tok, self._len = tokenizer, seq_len

    def map(self, examples: list[dict]) -> dict[str, np.ndarray]:
        cls, sep, cut = self._tok.cls_id, self._tok.sep_id, self._len - 2
        encoded = self._tok.encode_batch([e["question"] for e in examples]
                                         + [e["passage"] for e in examples])
        rows = [[cls, *ids[:cut], sep] for ids in encoded]
        queries = _padded(rows[:len(examples)], self._len, self._tok.pad_id)
        passages = _padded(rows[len(examples):], self._len, self._tok.pad_id)
        batch = dict(zip(("tokens", "segment_ids", "positions"), queries))
        batch.update(zip(("passage_tokens", "passage_segment_ids", "passage_positions"),
                         passages))
        batch["passage_key"] = np.array([passage_key(e["passage_id"]) for e in examples],
                                        np.int32)
        batch["example_weight"] = np.array([e.get("example_weight", 1.0) for e in examples],
                                           np.float32)
        return batch


def make_train_iterator(source, tokenizer, data_cfg, *, seed: int,
                        process_index=None, process_count=None) -> grain.DatasetIterator:
    """Infinite, shuffled per epoch, deterministic in `seed`; each process its own slice.

    Shuffled pairs can put two questions about one passage in a batch; the loss masks
    them (train/objectives.py `in_batch_contrastive`) rather than the sampler avoiding it.
    """
    p, n = pipeline._process(process_index, process_count)
    batch = pipeline.per_process_batch(data_cfg.batch_size, n, "batch_size")
    ds = grain.MapDataset.source(source).shuffle(seed=pipeline._train_seed(seed, data_cfg))
    ds = ds.repeat()[p::n].batch(batch, drop_remainder=True, batch_fn=list)
    ds = ds.map(EncodePairs(tokenizer, data_cfg.seq_len))
    return iter(ds.to_iter_dataset(pipeline._READ))


def make_eval_iterator(source, tokenizer, data_cfg, *, process_index=None,
                       process_count=None) -> grain.DatasetIterator:
    """One in-order pass, tail rows filled with weight-0 copies (as pipeline's). In-batch
    accuracy depends on the batch: eval_batch_size pairs compete."""
    p, n = pipeline._process(process_index, process_count)
    batch = pipeline.per_process_batch(data_cfg.eval_batch_size, n, "eval_batch_size")
    length = pipeline.num_eval_batches(len(source), data_cfg.eval_batch_size, n) * batch
    ds = grain.MapDataset.source(pipeline._PaddedShard(source, p, n, length))
    ds = ds.batch(batch, drop_remainder=True, batch_fn=list)
    ds = ds.map(EncodePairs(tokenizer, data_cfg.seq_len))
    return iter(ds.to_iter_dataset(pipeline._READ))
