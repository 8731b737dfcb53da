"""Verifiable rewards by name (`config.post_train.reward`): one completion and its gold
answers -> a float. Each is its correctness score plus a small format bonus
(`config.post_train.format_reward` times `format_score`): the answer ended with the
end-of-turn token, is one line and at most `MAX_ANSWER_WORDS` words, what the chat prompt
asks for ("Answer briefly, in a few words").

  exact_match     1 when the normalised answer equals a gold answer (SQuAD's
                  normalisation, as retrieval/rag.py scores RAG answers)
  gold_contained  1 when a gold answer occurs in the answer as whole words

Adding a reward: a function (answer text, gold answers) -> [0, 1] and one entry here.
"""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
MAX_ANSWER_WORDS = 6


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD; retrieval/rag.py's
    normalisation, which train/ may not import)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(answer: str, golds) -> float:
    predicted = normalize_answer(answer)
    return float(any(predicted == normalize_answer(g) for g in golds))


def gold_contained(answer: str, golds) -> float:
    """A gold answer in the answer, case-insensitive, not inside a longer word."""
    predicted = " ".join(answer.lower().split())
    return float(any(re.search(rf"(?<!\w){re.escape(' '.join(g.lower().split()))}(?!\w)",
                               predicted) for g in golds if g.strip()))


def format_score(answer: str, finished: bool) -> float:
    """1 for a finished, one-line answer of 1..MAX_ANSWER_WORDS words, else 0."""
    lines = [line for line in answer.strip().splitlines() if line.strip()]
    words = answer.split()
    return float(finished and len(lines) == 1 and 0 < len(words) <= MAX_ANSWER_WORDS)


CORRECTNESS = {"exact_match": exact_match, "gold_contained": gold_contained}


def check_reward(name: str, format_weight: float) -> None:
    if name not in CORRECTNESS:
        raise ValueError(f"config.post_train.reward={name!r} is not a reward function; "
                         f"known: {', '.join(sorted(CORRECTNESS))} "
                         f"(train/post_training/rewards.py)")
    if format_weight < 0:
        raise ValueError(f"config.post_train.format_reward={format_weight}; expected >= 0")


def reward(name: str, answer: str, golds, finished: bool, format_weight: float) -> float:
    """The reward `name` of one completion: correctness + format_weight * format."""
    check_reward(name, format_weight)
    return CORRECTNESS[name](answer, golds) + format_weight * format_score(answer, finished)
