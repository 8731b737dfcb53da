"""In-context learning with a chat decoder, no weight update: k demonstrations from the
training split in the prompt, then the question.

Classification (part of speech of the word a WordNet gloss defines: noun, verb,
adjective, adverb) is scored by constrained choice: each label name's total
log-probability as the assistant's answer (its tokens and the end-of-turn token), the
most likely label wins, so every answer is a valid label and no parsing is involved.
Demonstrations are drawn with a fixed seed, the same for every query at a given k, and
balanced over the labels; evaluation examples are balanced too (chance = 1 / labels).

The weight-update comparison: `fine_tune` trains a PEFT method (LoRA) through the one
trainer builder on n of the same training examples (`pos_demonstrations(train, n)`: for
n = k the k-shot prompt's own), loss on the label and its end-of-turn token after the
zero-shot prompt (`label_batch`), then `evaluate_k_shot(..., k=0)` scores it by the same
constrained choice on the same test glosses. Intervals: Wilson for proportions,
percentile bootstrap for means of other per-example scores and paired differences, the
exact McNemar test for paired 0/1 outcomes (train/experiments/statistics.py).
"""

import dataclasses

import numpy as np

from train.data import wordnet
from train.experiments.statistics import wilson

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


def pos_demonstrations(train, k, seed=0):
    """k examples of `train` (the training split) drawn with `seed` + k, balanced over the
    labels (max(1, k // 4) of each, the first k kept), shuffled: the same for every query."""
    if not k:
        return []
    rng = np.random.default_rng(seed + k)
    per_label = max(1, k // len(CHOICES))
    pools = {c: [e for e in train if e.label == c] for c in CHOICES}
    demos = [pools[c][i] for c in CHOICES
             for i in rng.choice(len(pools[c]), per_label, replace=False)][:k]
    return [demos[i] for i in rng.permutation(len(demos))]


def evaluate_k_shot(model, params, tok, train, test, k, seed=0):
    """Accuracy (and its 95% Wilson interval) of k-shot constrained choice on `test`;
    "correct": each test example's 0/1, for paired comparisons between rows."""
    demos = pos_demonstrations(train, k, seed)
    prompts = [tok.encode(tok.apply_chat_template(chat_messages(demos, q))) for q in test]
    scores = choose(model, params, tok, prompts)
    predicted = [CHOICES[j] for j in scores.argmax(1)]
    hits = [int(p == q.label) for p, q in zip(predicted, test)]
    correct = sum(hits)
    return {"k": k, "accuracy": correct / len(test), "interval": wilson(correct, len(test)),
            "examples": len(test), "predicted": {c: predicted.count(c) for c in CHOICES},
            "correct": hits}


# --- LoRA fine-tuning on the same examples ------------------------------------------------

def label_batch(tok, examples, seq_len):
    """Examples -> one prefix-LM batch (train/tasks/prefix_lm_examples.py's fields): the
    zero-shot ChatML prompt (`chat_messages([], example)`, what the fine-tuned model is
    asked), then the label's tokens and the end-of-turn token, the only positions with
    loss: what `choose` scores. Rows right-padded to `seq_len`; a longer one is an error."""
    tokens = np.full((len(examples), seq_len), tok.pad_id, np.int32)
    prefix_mask = np.zeros(tokens.shape, bool)
    target_weights = np.zeros(tokens.shape, np.float32)
    lengths = np.zeros((len(examples),), np.int32)
    for i, example in enumerate(examples):
        prompt = list(tok.encode(tok.apply_chat_template(chat_messages([], example))))
        row = prompt + list(tok.encode(example.label)) + [tok.eos_id]
        if len(row) > seq_len:
            raise ValueError(f"The gloss {example.text[:40]!r} takes {len(row)} tokens with "
                             f"its prompt and label; seq_len={seq_len}")
        tokens[i, :len(row)], lengths[i] = row, len(row)
        prefix_mask[i, :len(prompt)] = True
        target_weights[i, len(prompt) - 1:len(row) - 1] = 1.0  # Position j predicts j + 1.
    real = np.arange(seq_len)[None, :] < lengths[:, None]
    return {"tokens": tokens, "segment_ids": real.astype(np.int32),
            "positions": np.where(real, np.arange(seq_len)[None, :], 0).astype(np.int32),
            "prefix_mask": prefix_mask,
            "targets": np.concatenate([tokens[:, 1:], np.full((len(examples), 1), tok.pad_id,
                                                              np.int32)], axis=1),
            "target_weights": target_weights,
            "example_weight": np.ones((len(examples),), np.float32)}


def fine_tune(config, tok, examples, seed=0, on_step=None):
    """Fine-tunes `config`'s model (a prefix_lm decoder config with a PEFT method, e.g.
    configs/decoder.py:method=lora; config.init_from its weights) on `examples` for
    config.train.num_steps steps of config.data.batch_size rows, seeded epoch shuffles,
    through the one trainer builder's compiled step (no checkpoints, no evaluation);
    `on_step(step, loss)` after each. -> (model, params, per-step losses)."""
    import jax

    from train.init_from import init_params_from
    from train.trainer import build_trainer

    trainer = build_trainer(config)
    state = trainer.init_state()
    if config.init_from:
        params, _ = init_params_from(config.init_from, state.params)
        state = state.replace(params=params, opt_state=trainer.init_opt_state(params))
    rng, order, losses = np.random.default_rng(seed), [], []
    rows = config.data.batch_size
    with trainer.context():
        for step in range(config.train.num_steps):
            while len(order) < rows:  # Whole epochs, each shuffled.
                order += list(rng.permutation(len(examples)))
            chosen, order = order[:rows], order[rows:]
            batch = label_batch(tok, [examples[i] for i in chosen], config.data.seq_len)
            state, metrics = trainer.train_step(state, trainer.global_batch(batch))
            losses.append(float(metrics["loss"]))
            if on_step:
                on_step(step, losses[-1])
    return trainer.model, jax.tree.map(np.asarray, state.params), losses
