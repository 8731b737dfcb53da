"""In-context learning with a chat decoder, no weight update: k demonstrations from the
training split in the prompt, then the question.

Classification (part of speech of the word a WordNet gloss defines: noun, verb,
adjective, adverb) is scored by constrained choice: each label name's total
log-probability as the assistant's answer (its tokens and the end-of-turn token), the
most likely label wins, so every answer is a valid label and no parsing is involved.
Demonstrations are drawn with a fixed seed, the same for every query at a given k, and
balanced over the labels; evaluation examples are balanced too (chance = 1 / labels).
"""

import dataclasses

import numpy as np

from train.data import wordnet

LABELS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
CHOICES = ("noun", "verb", "adjective", "adverb")
SYSTEM = ("You classify dictionary definitions. Say which part of speech the defined "
          "word is: answer with exactly one word, one of: " + ", ".join(CHOICES) + ".")


@dataclasses.dataclass(frozen=True)
class Example:
    text: str  # The gloss.
    label: str  # One of CHOICES.


def pos_examples(synsets, split, per_label, seed):
    """`per_label` glosses of each part of speech from `split` (by synset id hash),
    shuffled with `seed`."""
    rng = np.random.default_rng(seed)
    by_label = {c: [] for c in CHOICES}
    for synset_id in sorted(synsets):
        s = synsets[synset_id]
        if wordnet.split_of(synset_id) == split and s.gloss:
            by_label[LABELS[s.pos]].append(Example(s.gloss, LABELS[s.pos]))
    chosen = []
    for label in CHOICES:
        pool = by_label[label]
        if len(pool) < per_label:
            raise ValueError(f"split {split!r} has {len(pool)} {label} glosses; "
                             f"{per_label} asked for")
        chosen += [pool[i] for i in rng.choice(len(pool), per_label, replace=False)]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def chat_messages(demos, query):
    """ChatML turns: the instruction, k (definition, label) exchanges, the query."""
    messages = [{"role": "system", "content": SYSTEM}]
    for demo in demos:
        messages += [{"role": "user", "content": f"Definition: {demo.text}"},
                     {"role": "assistant", "content": demo.label}]
    return messages + [{"role": "user", "content": f"Definition: {query.text}"}]


def choose(model, params, tok, prompts_ids, choices=CHOICES):
    """-> [n, choices] total log-probabilities of each choice (its tokens and the
    end-of-turn token) as the continuation of each prompt."""
    from model.decoding import token_log_probs

    choice_ids = [list(tok.encode(c)) + [tok.eos_id] for c in choices]
    sequences = [list(p) + c for p in prompts_ids for c in choice_ids]
    scores = []
    for start in range(0, len(sequences), 32):  # Batches of 32 rows.
        scores += token_log_probs(model, params, sequences[start:start + 32])
    out = np.zeros((len(prompts_ids), len(choices)))
    for i, prompt in enumerate(prompts_ids):
        for j in range(len(choices)):
            out[i, j] = scores[i * len(choices) + j][len(prompt) - 1:].sum()
    return out


def evaluate_k_shot(model, params, tok, train, test, k, seed=0):
    """Accuracy (and its 95% Wilson interval) of k-shot constrained choice on `test`."""
    rng = np.random.default_rng(seed + k)
    per_label = max(1, k // len(CHOICES))
    demos = []
    if k:
        pools = {c: [e for e in train if e.label == c] for c in CHOICES}
        demos = [pools[c][i] for c in CHOICES
                 for i in rng.choice(len(pools[c]), per_label, replace=False)][:k]
        demos = [demos[i] for i in rng.permutation(len(demos))]
    prompts = [tok.encode(tok.apply_chat_template(chat_messages(demos, q))) for q in test]
    scores = choose(model, params, tok, prompts)
    predicted = [CHOICES[j] for j in scores.argmax(1)]
    correct = int(sum(p == q.label for p, q in zip(predicted, test)))
    return {"k": k, "accuracy": correct / len(test), "interval": wilson(correct, len(test)),
            "examples": len(test), "predicted": {c: predicted.count(c) for c in CHOICES}}


def wilson(successes, n, z=1.96):
    """The Wilson score interval of a binomial proportion (95% at z = 1.96)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, float(centre - half)), min(1.0, float(centre + half)))
