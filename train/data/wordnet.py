"""WordNet 3.0 as a tfds dataset: one example per synset, labelled by lexicographer file.

Built from the local Princeton data files (Debian `wordnet-base`), so nothing is downloaded:
`_split_generators` only reads `<wordnet_dir>/data.{noun,verb,adj,adv}`. Stored as array_record:
`builder.as_data_source(split)` reads it without TensorFlow; strata's pipeline reads it through
`records.TfdsSplit` (same files, faster decoding).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from train.data.builder_base import LocalBuilder

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"

# File suffix -> the synset-id letter used for every synset in that file. Adjective
# satellites ('s' in the file) keep 'a' here; their ss_type field says 's'.
POS_FILES = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}

# The standard lexicographer files; `lex_filenum` in the data files indexes this list.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal",
    "noun.artifact", "noun.attribute", "noun.body", "noun.cognition", "noun.communication",
    "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip

HYPERNYM_SYMBOLS = ("@", "@i")
SPLIT_PERCENT = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}

_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")  # Syntactic marker on adjective words: "big(a)".
_QUOTED = re.compile(r'"([^"]*)"')


def resolve_wordnet_dir(wordnet_dir: str | os.PathLike | None = None) -> Path:
    """Explicit dir, else `$WORDNET_DIR`, else /usr/share/wordnet."""
    return Path(wordnet_dir or os.environ.get("WORDNET_DIR") or DEFAULT_WORDNET_DIR)


def check_wordnet_dir(wordnet_dir: Path) -> None:
    missing = [f"data.{p}" for p in POS_FILES if not (wordnet_dir / f"data.{p}").is_file()]
    if missing:
        raise FileNotFoundError(
            f"WordNet data files {missing} not found in {str(wordnet_dir)!r}. Install the "
            "`wordnet-base` system package (`apt-get install wordnet-base`) or set "
            "`config.data.wordnet_dir` / `$WORDNET_DIR` to a directory holding "
            "data.noun, data.verb, data.adj and data.adv."
        )


def split_of(synset_id: str) -> str:
    """Stable 80/10/10 split by md5 of the synset id (independent of file order)."""
    bucket = int(hashlib.md5(synset_id.encode()).hexdigest(), 16) % 100
    for name, (lo, hi) in SPLIT_PERCENT.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError(bucket)


def split_gloss(gloss_field: str) -> tuple[str, list[str]]:
    """`'defn; "ex 1"; "ex 2"'` -> ("defn", ["ex 1", "ex 2"]).

    Examples start at the first quote that opens the field or follows ';' / ':'; quotes
    inside the definition ('the phrase "make strides"') stay in the gloss.
    """
    text = gloss_field.strip()
    start = None
    for m in _QUOTED.finditer(text):
        before = text[: m.start()].rstrip()
        if not before or before[-1] in ";:":
            start = m.start()
            break
    if start is None:
        return text.rstrip("; ").strip(), []
    gloss = text[:start].rstrip().rstrip(";:").strip()
    examples = [e.strip() for e in _QUOTED.findall(text[start:]) if e.strip()]
    return gloss, examples


@dataclasses.dataclass(frozen=True)
class Synset:
    synset_id: str
    pos: str
    ss_type: str
    lexname: int
    lemmas: list[str]
    gloss: str
    examples: list[str]
    hypernyms: list[str]


def parse_line(line: str, pos: str) -> Synset:
    """Parses one data-file line (see wndb(5WN)).

    `offset lex_filenum ss_type w_cnt(hex) [word lex_id]* p_cnt [sym offset pos src_tgt]*
    [f_cnt [+ f_num w_num]*  (verbs only)] | gloss`
    """
    head, sep, gloss_field = line.partition(" | ")
    if not sep:  # A gloss-less line would end in " |".
        head, gloss_field = line.rstrip().removesuffix("|"), ""
    f = head.split()
    offset, lex_filenum, ss_type = f[0], int(f[1]), f[2]
    w_cnt = int(f[3], 16)
    i = 4
    lemmas = []
    for _ in range(w_cnt):
        lemmas.append(_ADJ_MARKER.sub("", f[i]).replace("_", " "))
        i += 2  # Skip lex_id.
    p_cnt = int(f[i])
    i += 1
    hypernyms = []
    for _ in range(p_cnt):
        symbol, target, target_pos = f[i], f[i + 1], f[i + 2]
        if symbol in HYPERNYM_SYMBOLS:
            hypernyms.append(("a" if target_pos == "s" else target_pos) + target)
        i += 4
    # Verb frames (f_cnt ...) follow; nothing there is needed.
    gloss, examples = split_gloss(gloss_field)
    return Synset(
        synset_id=pos + offset,
        pos=pos,
        ss_type=ss_type,
        lexname=lex_filenum,
        lemmas=lemmas,
        gloss=gloss,
        examples=examples,
        hypernyms=hypernyms,
    )


def iter_synsets(wordnet_dir: Path, pos_file: str) -> Iterator[Synset]:
    """Synsets of `data.<pos_file>`, skipping the license header (lines starting '  ')."""
    path = wordnet_dir / f"data.{pos_file}"
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.startswith("  ") or not line.strip():
                continue
            try:
                yield parse_line(line, POS_FILES[pos_file])
            except (IndexError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: cannot parse WordNet line: {e}") from e


class Wordnet(LocalBuilder, skip_registration=True):
    """WordNet 3.0 synsets with gloss, examples, lemmas, hypernyms and lexname label.

    Not registered with tfds (its built-in `wordnet` is the unrelated WN18 KG dataset), and
    stored under the name `strata_wordnet` so the two never share a cache directory.
    """

    name = "strata_wordnet"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "WordNet 3.0 synsets, md5(synset_id) 80/10/10 split."}

    def __init__(self, *, wordnet_dir: str | os.PathLike | None = None, **kwargs):
        self.wordnet_dir = resolve_wordnet_dir(wordnet_dir)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        lexname = tfds.features.ClassLabel(names=list(LEXNAMES))
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "synset_id": tfds.features.Text(),
                    "pos": tfds.features.Text(),
                    "ss_type": tfds.features.Text(),
                    "lexname": lexname,
                    "lemmas": tfds.features.Sequence(tfds.features.Text()),
                    "gloss": tfds.features.Text(),
                    "examples": tfds.features.Sequence(tfds.features.Text()),
                    "hypernyms": tfds.features.Sequence(tfds.features.Text()),
                    "text": tfds.features.Text(),  # = gloss, for generic text_key="text".
                    "label": tfds.features.ClassLabel(names=list(LEXNAMES)),  # = lexname.
                }
            ),
            supervised_keys=("text", "label"),
            homepage="https://wordnet.princeton.edu/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Local files only.
        check_wordnet_dir(self.wordnet_dir)
        # Parse the files once (~1 s), then hand each split its synsets.
        by_split = {split: [] for split in SPLIT_PERCENT}
        for pos_file in POS_FILES:
            for s in iter_synsets(self.wordnet_dir, pos_file):
                by_split[split_of(s.synset_id)].append(s)
        # tfds cannot write an empty split (only possible for a tiny WORDNET_DIR subset).
        return {split: self._generate_examples(ss) for split, ss in by_split.items() if ss}

    def _generate_examples(self, synsets: list[Synset]):
        for s in synsets:
            yield (
                s.synset_id,
                {
                    "synset_id": s.synset_id,
                    "pos": s.pos,
                    "ss_type": s.ss_type,
                    "lexname": s.lexname,
                    "lemmas": s.lemmas,
                    "gloss": s.gloss,
                    "examples": s.examples,
                    "hypernyms": s.hypernyms,
                    "text": s.gloss,
                    "label": s.lexname,
                },
            )
