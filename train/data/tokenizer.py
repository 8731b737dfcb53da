"""Sentencepiece (unigram) tokenizer, trained once on the training split and cached;
or a pre-trained checkpoint's WordPiece vocabulary (`WordPieceTokenizer`); or the byte-level
BPE and ChatML template inside a GGUF decoder checkpoint (`GGUFBPETokenizer`).

Sentencepiece's fixed special ids, shared by every model strata trains from scratch:
  0 [PAD]  1 [UNK]  2 [CLS] (= bos)  3 [SEP] (= eos)  4 [MASK]
[PAD]/[CLS]/[SEP]/[MASK] are control symbols: text never encodes to them and decode drops them.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from train.data import sources

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_PIECES = {PAD: 0, UNK: 1, CLS: 2, SEP: 3, MASK: 4}
MAX_TEXT_CHARS = 8192  # Longer texts are cut for training (sentencepiece skips long lines).

# Incremented by every `train_tokenizer` call; tests use it to prove the cache is reused.
train_count = 0


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """A loaded sentencepiece model with strata's special ids.

    Attributes: pad_id, unk_id, cls_id (= bos_id), sep_id (= eos_id), mask_id, vocab_size
    (pieces in the model; <= the requested size on small corpora), special_ids, path.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._load()

    def _load(self):
        path = self.path
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Tokenizer file {path!r} not found; expected a sentencepiece .model file "
                "(unset config.data.tokenizer_path to train one on the training split)"
            )
        sp = spm.SentencePieceProcessor()
        try:
            with open(path, "rb") as fh:
                sp.LoadFromSerializedProto(fh.read())
        except (OSError, RuntimeError) as e:
            raise TokenizerError(
                f"Cannot load tokenizer {path!r}: expected a sentencepiece .model file ({e})"
            ) from e
        wrong = {
            piece: (sp.piece_to_id(piece), want)
            for piece, want in SPECIAL_PIECES.items()
            if sp.piece_to_id(piece) != want or sp.id_to_piece(want) != piece
        }
        if wrong:
            raise TokenizerError(
                f"Tokenizer {path!r} has the wrong special ids (piece: (id, expected)): {wrong}; "
                f"strata expects {SPECIAL_PIECES}"
            )
        self._sp = sp
        self.pad_id, self.unk_id = SPECIAL_PIECES[PAD], SPECIAL_PIECES[UNK]
        self.cls_id, self.sep_id = SPECIAL_PIECES[CLS], SPECIAL_PIECES[SEP]
        self.mask_id = SPECIAL_PIECES[MASK]
        self.bos_id, self.eos_id = self.cls_id, self.sep_id
        self.special_ids = frozenset(SPECIAL_PIECES.values())
        self.vocab_size = sp.get_piece_size()
        # Lookup table: does piece i start a word? Specials count as their own word so a
        # whole-word span never runs across them.
        starts = np.array(
            [sp.id_to_piece(i).startswith("\u2581") for i in range(self.vocab_size)], bool
        )
        starts[list(self.special_ids)] = True
        self._word_start = starts

    def encode(self, text: str) -> list[int]:
        """Text -> piece ids (no [CLS]/[SEP]; the pipeline adds them)."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)

    def decode(self, ids) -> str:
        """Ids -> text; control ids ([PAD], [CLS], [SEP], [MASK]) are dropped."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def word_start_mask(self, ids) -> np.ndarray:
        """bool array shaped like `ids`: True where the piece begins a word ("▁...")."""
        return self._word_start[np.asarray(ids, dtype=np.int64)]

    def __getstate__(self):  # Picklable for grain workers: reload from the file there.
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._load()


class WordPieceTokenizer:
    """A BERT WordPiece vocabulary (`vocab.txt`, one piece per line, id = line number),
    tokenising exactly as HF's BertTokenizer: clean text, split CJK characters, lowercase
    and strip accents (uncased checkpoints), split on whitespace and punctuation, then
    greedy longest-match WordPiece with "##" continuations.

    Same interface as `Tokenizer`; the special ids are the vocabulary's own (BERT uncased:
    [PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103). `lowercase` defaults to the
    `do_lower_case` of a `tokenizer_config.json` beside the vocab, else True.
    """

    def __init__(self, path: str | os.PathLike, lowercase: bool | None = None):
        self.path = str(path)
        self.lowercase = lowercase
        self._load()

    def _load(self):
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import decoders, models, normalizers, pre_tokenizers

        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"WordPiece vocabulary {self.path!r} not found; expected a BERT vocab.txt "
                "(config.data.tokenizer_path: the file, its directory, or hf:minilm)")
        with open(self.path, encoding="utf-8") as f:
            pieces = [line.rstrip("\n") for line in f]
        vocab = {piece: i for i, piece in enumerate(pieces)}
        missing = [p for p in SPECIAL_PIECES if p not in vocab]
        if missing:
            raise TokenizerError(f"WordPiece vocabulary {self.path!r} lacks {missing}")
        if self.lowercase is None:
            self.lowercase = _do_lower_case(os.path.dirname(self.path))
        tok = HfTokenizer(models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
        # strip_accents=None follows lowercase, as BertTokenizer's default.
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None,
            lowercase=self.lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        self._tok, self._pieces = tok, pieces
        self.pad_id, self.unk_id = vocab[PAD], vocab[UNK]
        self.cls_id, self.sep_id, self.mask_id = vocab[CLS], vocab[SEP], vocab[MASK]
        self.bos_id, self.eos_id = self.cls_id, self.sep_id
        self.special_ids = frozenset(vocab[p] for p in SPECIAL_PIECES)
        self.vocab_size = len(pieces)
        # A piece starts a word unless it continues one ("##..."); specials are words.
        starts = np.array([not p.startswith("##") for p in pieces], bool)
        starts[list(self.special_ids)] = True
        self._word_start = starts

    def encode(self, text: str) -> list[int]:
        """Text -> piece ids (no [CLS]/[SEP]; the pipeline adds them)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Ids -> text; the special ids are dropped."""
        return self._tok.decode([int(i) for i in ids if int(i) not in self.special_ids
                                 or int(i) == self.unk_id])

    def id_to_piece(self, i: int) -> str:
        return self._pieces[int(i)]

    def word_start_mask(self, ids) -> np.ndarray:
        """bool array shaped like `ids`: True where the piece begins a word (not "##")."""
        return self._word_start[np.asarray(ids, dtype=np.int64)]

    def __getstate__(self):  # Picklable for grain workers: reload from the file there.
        return {"path": self.path, "lowercase": self.lowercase}

    def __setstate__(self, state):
        self.path, self.lowercase = state["path"], state["lowercase"]
        self._load()


class GGUFBPETokenizer:
    """The GPT-2-style byte-level BPE stored in a GGUF file (`tokenizer.ggml.model="gpt2"`):
    its vocabulary, merges and pre-tokenizer rule, its CONTROL tokens as special tokens, and
    its ChatML chat template (`apply_chat_template`).

    Same interface as `Tokenizer`, with the file's own special ids: cls_id = bos_id
    (`<|im_start|>` = 1 for SmolLM2), sep_id = eos_id (`<|im_end|>` = 2), pad_id (the file's
    padding_token_id, = eos for SmolLM2: rows carry explicit lengths, so padding never
    needs an id of its own), unk_id (`<|endoftext|>` = 0; byte-level BPE never emits it).
    mask_id is None: a causal decoder has no [MASK]. `encode` turns special-token text
    ("<|im_start|>") into its id, so a rendered chat template encodes as the model expects.
    `path`: the `.gguf` file, or a `gguf:` spec (see `model.gguf.resolve_path`).

    Like Hugging Face's tokenizer for the same vocabulary (BPE without an unknown token),
    bytes absent from the vocabulary's alphabet are dropped: SmolLM2 lacks 21 (six ASCII
    control characters such as 0x04, and bytes that UTF-8 never or rarely uses).
    """

    # `tokenizer.ggml.pre` -> split digits one per piece before the GPT-2 regex? (llama.cpp's
    # llama-vocab.cpp gives "smollm" and "starcoder" the \p{N} split, HF tokenizer.json a
    # Digits(individual_digits) pre-tokenizer ahead of ByteLevel.)
    PRE_TOKENIZERS = {"gpt2": False, "smollm": True, "starcoder": True}
    CONTROL = 3  # llama.cpp's token_type of a control (special) token.

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._load()

    def _load(self):
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HfTokenizer

        from model import gguf

        self.file = gguf.resolve_path(self.path)
        stat = os.stat(self.file)
        meta = _gguf_metadata(self.file, stat.st_mtime_ns, stat.st_size)
        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
        if kind != "gpt2" or pre not in self.PRE_TOKENIZERS:
            raise TokenizerError(
                f"{self.file}: tokenizer.ggml.model={kind!r}, tokenizer.ggml.pre={pre!r}; "
                f"strata builds 'gpt2' byte-level BPE with pre in {sorted(self.PRE_TOKENIZERS)}")
        pieces = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type", [1] * len(pieces)))
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        vocab = {piece: i for i, piece in enumerate(pieces)}
        tok = HfTokenizer(models.BPE(vocab, merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if self.PRE_TOKENIZERS[pre] else byte_level)
        tok.decoder = decoders.ByteLevel()
        control = [i for i, t in enumerate(types) if t == self.CONTROL]
        tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                                for i in control])
        self._tok, self._pieces = tok, pieces
        self.chat_template = meta.get("tokenizer.chat_template", "")
        self.bos_id = int(meta.get("tokenizer.ggml.bos_token_id", 1))
        self.eos_id = int(meta.get("tokenizer.ggml.eos_token_id", 2))
        self.pad_id = int(meta.get("tokenizer.ggml.padding_token_id", self.eos_id))
        self.unk_id = int(meta.get("tokenizer.ggml.unknown_token_id", 0))
        self.cls_id, self.sep_id, self.mask_id = self.bos_id, self.eos_id, None
        self.special_ids = frozenset(control)
        self.vocab_size = len(pieces)
        # A piece starts a word when it begins with the byte-level space "Ġ"; specials
        # count as their own word.
        starts = np.array([p.startswith("\u0120") for p in pieces], bool)
        starts[control] = True
        self._word_start = starts

    def encode(self, text: str) -> list[int]:
        """Text -> piece ids (no bos/eos added); special-token text maps to its id."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = True) -> str:
        """Ids -> text; the special ids are dropped unless `skip_special=False`."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_piece(self, i: int) -> str:
        return self._pieces[int(i)]

    def word_start_mask(self, ids) -> np.ndarray:
        """bool array shaped like `ids`: True where the piece begins with a space ("Ġ")."""
        return self._word_start[np.asarray(ids, dtype=np.int64)]

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """[{"role", "content"}, ...] -> the ChatML text the file's template renders:
        "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message, preceded by the
        template's default system message when the first message is not a system one,
        and followed by "<|im_start|>assistant\\n" when `add_generation_prompt`."""
        default_system = chatml_default_system(self.chat_template, self.file)
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TokenizerError(f"chat message {m!r}: expected string 'role' and "
                                     "'content'")
        turns = []
        if messages and messages[0]["role"] != "system" and default_system is not None:
            turns.append(("system", default_system))
        turns += [(m["role"], m["content"]) for m in messages]
        text = "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in turns)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def __getstate__(self):  # Picklable for grain workers: reload from the file there.
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._load()


@functools.lru_cache(maxsize=4)
def _gguf_metadata(path: str, mtime_ns: int, size: int) -> dict:
    """A GGUF file's metadata, parsed once per process and file version (~2.5 s: the
    reader walks 100k vocabulary and merge strings); every `get_tokenizer` call reuses it."""
    from model import gguf

    return gguf.read_metadata(path)


IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The pieces of a ChatML Jinja template that `apply_chat_template` reproduces, and where
# its optional default system message sits.
_CHATML_PARTS = ("'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'", "'<|im_start|>assistant\n'")
_DEFAULT_SYSTEM = re.compile(
    r"messages\[0\]\['role'\] != 'system' %\}\s*\{\{-?\s*"
    r"'<\|im_start\|>system\n(.*?)<\|im_end\|>\n'", re.DOTALL)


def chatml_default_system(template: str, source: str = "") -> str | None:
    """The default system message of a ChatML Jinja template (None if it has none); a
    template of another shape fails rather than being rendered wrong."""
    # Jinja reads the escape \\n in a string literal as a newline: compare in one form.
    flat = template.replace("\\n", "\n")
    missing = [p for p in _CHATML_PARTS if p not in flat]
    if not template or missing:
        raise TokenizerError(
            f"{source}: tokenizer.chat_template is not the ChatML template strata renders "
            f"(missing {missing}): {template!r}")
    found = _DEFAULT_SYSTEM.search(flat)
    return found.group(1) if found else None


def _do_lower_case(directory: str) -> bool:
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return bool(json.load(f).get("do_lower_case", True))
    return True


def wordpiece_vocab_path(spec: str) -> str:
    """`config.data.tokenizer_path` for WordPiece: a vocab.txt, its directory, or
    `hf:<alias|dir>` (the checkpoint's own vocabulary)."""
    if spec.startswith("hf:"):
        from model import hf_bert

        spec = hf_bert.resolve_dir(spec)
    spec = os.path.expanduser(spec)
    return os.path.join(spec, "vocab.txt") if os.path.isdir(spec) else spec


def _clean(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        t = " ".join(t[:MAX_TEXT_CHARS].split())  # Newlines would split "sentences".
        if t:
            yield t


def train_tokenizer(
    texts: Iterable[str], path: str | os.PathLike, vocab_size: int, *, num_threads: int = 2
) -> Tokenizer:
    """Trains a unigram model on `texts` and writes it atomically to `path`.

    Deterministic: input order is kept (no sampling/shuffling), so equal texts give
    byte-identical models. A killed run leaves at most a temp file, never a partial `path`.
    """
    global train_count
    train_count += 1
    path = Path(path)
    model = io.BytesIO()  # In memory: no temp prefix ends up inside the model proto.
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_clean(texts),
            model_writer=model,
            model_type="unigram",
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # Small corpora get fewer pieces instead of an error.
            character_coverage=0.9995,
            pad_id=SPECIAL_PIECES[PAD],
            pad_piece=PAD,
            unk_id=SPECIAL_PIECES[UNK],
            unk_piece=UNK,
            bos_id=SPECIAL_PIECES[CLS],
            bos_piece=CLS,
            eos_id=SPECIAL_PIECES[SEP],
            eos_piece=SEP,
            control_symbols=[MASK],
            # 1M seed pieces (the default) only slows training: pruning them to a small vocab
            # takes more EM rounds; 100k keeps compression unchanged on WordNet (~1.5x faster).
            seed_sentencepiece_size=max(100_000, 4 * vocab_size),
            input_sentence_size=0,  # Use all given texts (the caller caps them).
            shuffle_input_sentence=False,
            max_sentence_length=4 * MAX_TEXT_CHARS,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise TokenizerError(f"Training the tokenizer for {str(path)!r} failed: {e}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(model.getvalue())
        os.replace(tmp, path)  # Atomic: readers see the old state or the whole file.
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Tokenizer(path)


def tokenizer_path(data_cfg) -> Path:
    """`tokenizer_path`, else `<data_dir>/tokenizers/<dataset>-v<vocab>-s<sample>.model`.

    The dataset id of a local corpus includes its content fingerprint.
    """
    if data_cfg.tokenizer_path:
        return Path(data_cfg.tokenizer_path).expanduser()
    c = data_cfg
    name = f"{sources.dataset_name(c)}-v{c.vocab_size}-s{c.tokenizer_sample}.model"
    return Path(sources.data_dir(data_cfg)) / "tokenizers" / name


def get_tokenizer(data_cfg) -> Tokenizer | WordPieceTokenizer | GGUFBPETokenizer:
    """The cached tokenizer for `data_cfg`, training it on the train split the first time.

    An explicit `tokenizer_path` must exist (it is never trained over).
    `data_cfg.tokenizer="wordpiece"` loads a pre-trained checkpoint's vocabulary instead
    (`tokenizer_path`: vocab.txt, its directory or `hf:minilm`); `"gguf"` the BPE inside a
    GGUF checkpoint (`tokenizer_path`: `gguf:smollm2` or `gguf:<file>`).
    """
    kind = data_cfg.get("tokenizer", "sentencepiece")
    if kind == "gguf":
        spec = data_cfg.tokenizer_path
        if not spec or not spec.startswith("gguf:"):
            raise TokenizerError(
                f"config.data.tokenizer='gguf' needs config.data.tokenizer_path='gguf:smollm2' "
                f"or 'gguf:<file>', got {spec!r}")
        return GGUFBPETokenizer(spec)
    if kind == "wordpiece":
        if not data_cfg.tokenizer_path:
            raise TokenizerError(
                "config.data.tokenizer='wordpiece' needs config.data.tokenizer_path (a BERT "
                "vocab.txt, its directory, or hf:minilm)")
        return WordPieceTokenizer(wordpiece_vocab_path(data_cfg.tokenizer_path))
    if kind != "sentencepiece":
        raise TokenizerError(
            f"config.data.tokenizer={kind!r}; expected 'sentencepiece', 'wordpiece' or 'gguf'")
    path = tokenizer_path(data_cfg)
    if data_cfg.tokenizer_path or path.exists():
        return Tokenizer(path)
    texts = sources.training_texts(data_cfg, limit=data_cfg.tokenizer_sample)
    return train_tokenizer(texts, path, data_cfg.vocab_size)
