"""A knowledge-intensive QA task over WordNet 3.0: one passage per synset, and questions
whose answer is stated in exactly one passage.

Passage (id = synset id, e.g. "n02084071"):

    dog, domestic dog, Canis familiaris: a member of the genus Canis ... A kind of:
    canine; domestic animal. Examples: "the dog barked all night".

Questions (answers are lemmas: short; any lemma of the answer synset counts as right):
- "hypernym": "What is a <lemma> a kind of?" -> the lemmas of its one hypernym. Asked
  only for noun synsets with exactly one hypernym whose first lemma names no other
  synset in WordNet, so exactly one passage states what it is a kind of.
- "gloss": "Which word means '<gloss>'?" -> the synset's lemmas. Asked only when no other
  synset has the same gloss (so one passage states it) and the gloss is short.

Split by the synset the question is about (the passage that answers it), with the
dataset's own md5 split (train/data/wordnet.py `split_of`): test questions are about
synsets the generator never saw in training.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os

from train.data import wordnet

QUESTION_KINDS = ("hypernym", "gloss")
MAX_ANSWER_WORDS = 4  # Longer lemmas are not asked about: answers stay short.
MAX_GLOSS_WORDS = 16  # Longer glosses make questions that crowd out the passages.
MAX_EXAMPLES = 2  # Example sentences per passage.


@dataclasses.dataclass(frozen=True)
class Question:
    qid: str
    kind: str  # One of QUESTION_KINDS.
    question: str
    answers: tuple[str, ...]  # Any of them is right; answers[0] is what training targets.
    passage_id: str  # The one passage stating the answer (the subject's synset).
    split: str  # The subject synset's split.

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"answers": list(self.answers)}


@dataclasses.dataclass
class KnowledgeBase:
    """Passages by synset id, and the synsets they were written from."""

    synsets: dict[str, wordnet.Synset]
    passages: dict[str, str]

    def split_ids(self, split: str) -> list[str]:
        return [i for i in self.passages if wordnet.split_of(i) == split]


def load_synsets(wordnet_dir=None) -> dict[str, wordnet.Synset]:
    """Every synset of the WordNet files (~1 s), by id."""
    directory = wordnet.resolve_wordnet_dir(wordnet_dir or None)
    wordnet.check_wordnet_dir(directory)
    return {s.synset_id: s for pos in wordnet.POS_FILES
            for s in wordnet.iter_synsets(directory, pos)}


def passage_text(synset: wordnet.Synset, synsets: dict[str, wordnet.Synset]) -> str:
    text = f"{', '.join(synset.lemmas)}: {synset.gloss}."
    kinds = [synsets[h].lemmas[0] for h in synset.hypernyms if h in synsets]
    if kinds:  # Before the examples: a passage cut to fit a prompt keeps its facts.
        text += " A kind of: " + "; ".join(kinds) + "."
    if synset.examples:
        text += " Examples: " + "; ".join(f'"{e}"' for e in synset.examples[:MAX_EXAMPLES]) \
            + "."
    return text


def build_knowledge_base(synsets: dict[str, wordnet.Synset]) -> KnowledgeBase:
    return KnowledgeBase(synsets=synsets,
                         passages={i: passage_text(s, synsets) for i, s in synsets.items()})


def _short(text: str) -> bool:
    return 0 < len(text.split()) <= MAX_ANSWER_WORDS


def generate_questions(synsets: dict[str, wordnet.Synset]) -> list[Question]:
    """Every unambiguous question over `synsets` (see the module docstring), in id order."""
    synsets_of_lemma = collections.Counter(
        lemma.lower() for s in synsets.values() for lemma in set(s.lemmas))
    gloss_count = collections.Counter(s.gloss.lower() for s in synsets.values())
    questions = []
    for sid in sorted(synsets):
        s = synsets[sid]
        split = wordnet.split_of(sid)
        subject = s.lemmas[0]
        if (s.pos == "n" and len(s.hypernyms) == 1 and s.hypernyms[0] in synsets
                and synsets_of_lemma[subject.lower()] == 1 and _short(subject)):
            answers = tuple(a for a in synsets[s.hypernyms[0]].lemmas if _short(a))
            if answers and answers[0] == synsets[s.hypernyms[0]].lemmas[0]:
                questions.append(Question(f"{sid}-hypernym", "hypernym",
                                          f"What is a {subject} a kind of?", answers, sid,
                                          split))
        gloss = s.gloss.strip()
        if (gloss and gloss_count[gloss.lower()] == 1
                and len(gloss.split()) <= MAX_GLOSS_WORDS and _short(subject)):
            answers = tuple(a for a in s.lemmas if _short(a))
            questions.append(Question(f"{sid}-gloss", "gloss",
                                      f'Which word means "{gloss}"?', answers, sid, split))
    return questions


def passages_stating(question: Question, kb: KnowledgeBase) -> list[str]:
    """Ids of the passages that state `question`'s answer, read from the structured
    synsets: for "hypernym" the passages listing the subject lemma with the answer after
    "A kind of:", for "gloss" those with this gloss listing the answer among their lemmas.
    A well-formed question has exactly one (its `passage_id`)."""
    found = []
    if question.kind == "hypernym":
        subject = question.question.removeprefix("What is a ").removesuffix(" a kind of?")
        for sid, s in kb.synsets.items():
            if subject.lower() in (lemma.lower() for lemma in s.lemmas):
                kinds = kb.passages[sid].partition(" A kind of: ")[2]
                kinds = kinds.partition(". Examples: ")[0].rstrip(".").split("; ")
                if any(answer in kinds for answer in question.answers):
                    found.append(sid)
    else:
        gloss = question.question.removeprefix('Which word means "').removesuffix('"?')
        for sid, s in kb.synsets.items():
            if s.gloss.strip().lower() == gloss.lower() and set(question.answers) & set(
                    s.lemmas):
                found.append(sid)
    return found


def subsample(ids, count: int, salt: str) -> list[str]:
    """`count` of `ids` chosen by a stable hash (all when count <= 0 or >= len)."""
    ids = sorted(ids)
    if count <= 0 or count >= len(ids):
        return ids
    key = lambda i: hashlib.md5(f"{salt}:{i}".encode()).hexdigest()  # noqa: E731
    return sorted(sorted(ids, key=key)[:count])


def wordnet_dir_of(config) -> str:
    """The WordNet files the config names ("" -> $WORDNET_DIR or /usr/share/wordnet)."""
    return config.data.wordnet_dir or os.environ.get("WORDNET_DIR", "")
