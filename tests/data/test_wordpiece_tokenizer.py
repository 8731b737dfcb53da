"""The WordPiece tokenizer of pre-trained BERT checkpoints, in strata's data path."""

import pickle

import ml_collections
import numpy as np
import pytest

from train.data import pipeline
from train.data import tokenizer as tokenizers
from train.tasks import masking

PIECES = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat",
          "un", "##believ", "##able", "!", ",", "cafe", "hello"]


@pytest.fixture
def vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(PIECES) + "\n", encoding="utf-8")
    return path


def test_ids_specials_and_word_starts(vocab):
    tok = tokenizers.WordPieceTokenizer(vocab)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4, 5)
    assert tok.bos_id == tok.cls_id and tok.eos_id == tok.sep_id and tok.vocab_size == 16
    assert tok.special_ids == {0, 2, 3, 4, 5}
    ids = tok.encode("The CAT sat, Unbelievable! Café zebra")  # Lowercased, accents gone.
    assert [tok.id_to_piece(i) for i in ids] == [
        "the", "cat", "sat", ",", "un", "##believ", "##able", "!", "cafe", "[UNK]"]
    assert tok.word_start_mask(ids).tolist() == [True] * 5 + [False, False] + [True] * 3
    assert tok.decode([3, *ids, 4, 0]) == "the cat sat, unbelievable! cafe [UNK]"
    assert tok.encode_batch(["hello", "the cat"]) == [[15], [6, 7]]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("unbelievable") == [9, 10, 11]


def test_get_tokenizer_dispatches_on_config(vocab):
    cfg = ml_collections.ConfigDict(dict(tokenizer="wordpiece", tokenizer_path=str(vocab.parent)))
    assert isinstance(tokenizers.get_tokenizer(cfg), tokenizers.WordPieceTokenizer)
    cfg.tokenizer_path = ""
    with pytest.raises(tokenizers.TokenizerError, match="tokenizer_path"):
        tokenizers.get_tokenizer(cfg)
    cfg.tokenizer_path, cfg.tokenizer = str(vocab), "bpe"
    with pytest.raises(tokenizers.TokenizerError, match="'sentencepiece', 'wordpiece' or 'gguf'"):
        tokenizers.get_tokenizer(cfg)


def test_pipeline_and_masking_use_the_vocabulary_ids(vocab):
    """BERT's ids are not strata's 0..4: padding, [CLS]/[SEP] and masking read the tokenizer."""
    tok = tokenizers.WordPieceTokenizer(vocab)
    data_cfg = ml_collections.ConfigDict(dict(seq_len=8, packing=False, eval_batch_size=2))
    source = [{"text": "the cat sat", "label": 0}, {"text": "unbelievable", "label": 1}]
    batch = next(iter(pipeline.make_eval_iterator(source, tok, data_cfg)))
    assert batch["tokens"].tolist() == [[3, 6, 7, 8, 4, 0, 0, 0], [3, 9, 10, 11, 4, 0, 0, 0]]
    out = masking.mask_tokens(batch["tokens"], batch["segment_ids"],
                              rng=np.random.default_rng(0), tokenizer_info=tok,
                              mask_rate=1.0, max_predictions=4, whole_word=True)
    targets = out["mlm_targets"][out["mlm_weights"] > 0]
    assert set(targets.tolist()) <= {6, 7, 8, 9, 10, 11}  # Never [CLS]/[SEP]/[PAD].
    assert sorted(out["mlm_targets"][1][out["mlm_weights"][1] > 0]) == [9, 10, 11]  # One word.
