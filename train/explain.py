"""Explanations of a run's predictions: a classifier's (integrated gradients over token
embeddings, attention rollout) and a RAG answer's (attention mass on each retrieved
passage and its tokens).

The arithmetic is model/attribution.py's; this module loads what it needs from a run
(train/ensemble.py's `load_run`), encodes texts as the evaluation pipeline does, and
returns JSON-ready dicts. Drawing them is train/explain_render.py's job.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from model import attribution
from train.data import pipeline, sources
from train.data import tokenizer as tokenizers
from train.ensemble import load_run
from train.steps import model_inputs

BASELINES = ("pad", "zeros")


def load_classifier(workdir, which="best"):
    """-> (config, model, params, tokenizer) of a classification run; a ValueError naming
    config.model.heads when the run has no classification head."""
    path = os.path.join(workdir, "config.json")
    if os.path.isfile(path):  # Else load_run names the missing file.
        with open(path) as f:
            heads = tuple(json.load(f).get("model", {}).get("heads", ()))
        if "classify" not in heads:
            raise ValueError(
                f"{workdir!r} is not a classifier: its config.model.heads={heads} has no "
                f"'classify' head (for a RAG run pass --question, for a decoder use "
                f"launch.generate)")
    config, model, params = load_run(workdir, which)
    # Explanations sow attention weights: the plain (not rematerialised) block does that
    # cheaply; the parameters are the same.
    model = model.clone(cfg=dataclasses.replace(model.cfg, remat="none"))
    return config, model, params, tokenizers.get_tokenizer(config.data)


def encode_texts(config, tokenizer, texts):
    """Texts -> one dict per text with `tokens` and the model inputs (segment_ids,
    positions), each [length], encoded exactly as the evaluation pipeline encodes them
    ([CLS] pieces [SEP], cut at config.data.seq_len), padding dropped."""
    for i, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"--text #{i + 1} is empty: nothing to explain")
    rows = []
    source = [{"text": t} for t in texts]
    batches = pipeline.make_eval_iterator(source, tokenizer, config.data, with_labels=False,
                                          process_index=0, process_count=1)
    for batch in batches:
        for r in np.flatnonzero(batch["example_weight"] > 0):
            length = int(batch["segment_ids"][r].sum())
            row = {"tokens": batch["tokens"][r, :length]}
            row.update({k: v[r, :length] for k, v in model_inputs(batch).items()})
            rows.append(row)
    return rows


def split_examples(config, split, indices):
    """-> (examples at `indices` of the run's `split`, the split); an index outside it is
    an error naming --index."""
    source = sources.load_split(config.data, split)
    for i in indices:
        if not 0 <= i < len(source):
            raise ValueError(f"--index {i} is outside the {split!r} split "
                             f"(0..{len(source) - 1})")
    return [source[i] for i in indices], source


def test_examples(config, split, indices):
    """-> (texts, labels, label names) of `indices` of the run's `split`."""
    examples, source = split_examples(config, split, indices)
    return ([e["text"] for e in examples], [int(e["label"]) for e in examples],
            getattr(source, "label_names", None))


def baseline_embeddings(model, params, tokens, embeddings, kind, tokenizer):
    """The integrated-gradients baseline [seq, embed]: "zeros", or "pad": every piece's
    embedding replaced by [PAD]'s, special tokens ([CLS], [SEP]) kept (so the baseline
    is a well-formed input with no content)."""
    if kind not in BASELINES:
        raise ValueError(f"--baseline={kind!r}; expected one of {BASELINES}")
    if kind == "zeros":
        return jnp.zeros_like(embeddings)
    special = np.isin(np.asarray(tokens), list(tokenizer.special_ids))
    pad_tokens = np.where(special, tokens, tokenizer.pad_id)
    pad = model.apply({"params": params}, jnp.asarray(pad_tokens)[None],
                      method=lambda m, t: m.encoder.embed_tokens(t))[0]
    return pad


def sown_attention(model, params, tokens, heads, **inputs):
    """One example's forward pass with its attention weights -> (outputs,
    attentions [layers, heads, seq, seq] float32 numpy). `tokens`: ids [seq], or pixels
    [H, W, C] for image input (seq = 1 + patches)."""
    inputs = {k: jnp.asarray(v)[None] for k, v in inputs.items()}
    apply = jax.jit(lambda params, tokens, inputs: model.apply(
        {"params": params}, tokens, **inputs, deterministic=True, heads=heads,
        mutable=["intermediates"]))
    outputs, state = apply(params, jnp.asarray(tokens)[None], inputs)
    weights = attribution.stack_attention(state["intermediates"])  # Prefix keys dropped.
    return outputs, np.asarray(weights[:, 0], np.float32)


def prompt_positions(model, length):
    """Sequence positions seen by the blocks -> positions of the input (P-tuning /
    prompt tuning insert `prompt_length` vectors after [CLS])."""
    p = model.cfg.prompt_length
    return np.concatenate([[0], np.arange(1 + p, length + p)]) if p else np.arange(length)


def explain_classification(model, params, tokenizer, row, *, target=None, steps=64,
                           method="trapezoid", baseline="pad", tolerance=0.05,
                           label_names=None):
    """One encoded text (`encode_texts` row) -> a JSON-ready explanation.

    target: the class explained (default: the predicted one). Integrated gradients over
    the token embeddings of the target logit; each token's attribution is the sum over
    its embedding dimensions (their sum is the completeness check's). Attention rollout
    from the pooled position ([CLS] for cls pooling, the mean over real tokens for mean
    pooling) to every input token. A completeness gap above `tolerance` raises.
    """
    tokens = np.asarray(row["tokens"])
    inputs = {k: v for k, v in row.items() if k != "tokens"}
    outputs, attentions = sown_attention(model, params, tokens, ("classify",), **inputs)
    logits = np.asarray(outputs["classify"][0], np.float64)
    predicted = int(logits.argmax())
    target = predicted if target is None else int(target)
    if not 0 <= target < logits.size:
        raise ValueError(f"--target={target}: the model has {logits.size} classes")
    fn, embeddings = attribution.embedding_logit_fn(model, params, tokens, target=target,
                                                    **inputs)
    base = baseline_embeddings(model, params, tokens, embeddings, baseline, tokenizer)
    ig = attribution.integrated_gradients(fn, embeddings, base, steps=steps, method=method)
    attribution.check_completeness(ig, tolerance, f"class {target}")
    per_token = ig.attributions.sum(-1)
    rollout = attribution.attention_rollout(attentions)
    kept = prompt_positions(model, len(tokens))
    rollout = rollout[np.ix_(kept, kept)]  # Prompt vectors are no input tokens.
    pooled = rollout[0] if model.cfg.pooling == "cls" else rollout.mean(0)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()

    def name(c):
        return label_names[c] if label_names is not None else str(c)

    return {
        "tokens": [int(t) for t in tokens],
        "pieces": [tokenizer.id_to_piece(int(t)) for t in tokens],
        "logits": [float(x) for x in logits],
        "probabilities": [float(x) for x in probabilities],
        "predicted": predicted, "predicted_name": name(predicted),
        "target": target, "target_name": name(target),
        "integrated_gradients": {
            "attributions": [float(x) for x in per_token],
            "baseline": baseline, "steps": steps, "method": method,
            "target_logit": ig.value, "baseline_logit": ig.baseline_value,
            "sum": float(per_token.astype(np.float64).sum()),
            "completeness_abs_error": ig.completeness_abs_error,
            "completeness_rel_error": ig.completeness_rel_error,
            "tolerance": tolerance,
        },
        "attention_rollout": {"from": "[CLS]" if model.cfg.pooling == "cls" else "mean",
                              "weights": [float(x) for x in pooled]},
    }


# --- RAG answers --------------------------------------------------------------------------

def char_spans_to_tokens(token_ends, char_spans):
    """token_ends [n]: the character offset where each token's text ends in the decoded
    prompt; char_spans {name: (start, end)} -> {name: (first token, last token + 1)}, the
    tokens overlapping each character range."""
    ends = np.asarray(token_ends)
    starts = np.concatenate([[0], ends[:-1]])
    out = {}
    for name, (a, b) in char_spans.items():
        hit = np.flatnonzero((starts < b) & (ends > a))
        if hit.size == 0:
            raise ValueError(f"span {name!r} (characters {a}..{b}) covers no token")
        out[name] = (int(hit[0]), int(hit[-1]) + 1)
    return out


def chat_prompt_spans(tokenizer, ids, question, passages):
    """Token spans of the question and of each numbered passage "[i] text" in a ChatML
    prompt (train/tasks/chat_prompt.py) of byte-level BPE ids, found through the decoded
    text of every prefix of `ids` (specials kept: the decoding is the rendered text)."""
    text = tokenizer.decode(ids, skip_special=False)
    ends = [len(tokenizer.decode(ids[:i + 1], skip_special=False)) for i in range(len(ids))]
    if ends[-1] != len(text):
        raise ValueError("The prompt's tokens do not decode prefix by prefix to its text")
    spans, cursor = {}, 0
    for i, passage in enumerate(passages, start=1):
        start = text.find(f"[{i}] {passage}", cursor)
        if start < 0:
            raise ValueError(f"passage [{i}] is not in the decoded prompt")
        cursor = start + len(f"[{i}] {passage}")
        spans[f"passage {i}"] = (start, cursor)
    start = text.find(f"Question: {question}" if passages else question, cursor)
    if start < 0:
        raise ValueError("the question is not in the decoded prompt")
    spans["question"] = (start, start + len(question) + (10 if passages else 0))
    return char_spans_to_tokens(ends, spans)


def packed_prompt_spans(question_ids, passage_ids, used, prompt_length):
    """Token spans of the question and the `used` passages in a prefix-LM packed prompt
    of `prompt_length` ids: [CLS] question [SEP] p1 [SEP] p2 [SEP]
    (train/tasks/prefix_lm_examples.py: pack_prompt; the last passage may be cut)."""
    spans = {"question": (1, 1 + len(question_ids))}
    start = 2 + len(question_ids)
    for i, ids in enumerate(passage_ids[:used], start=1):
        end = min(start + len(ids), prompt_length - 1)  # Before the passage's [SEP].
        spans[f"passage {i}"] = (start, end)
        start = end + 1
    return spans


def answer_attention(model, params, ids, prompt_length, spans, *, prefix_mask=None,
                     top_tokens=8, tokenizer=None):
    """Where a generated answer looked: ids = prompt + answer pieces (no end token);
    spans {name: (start, end)} of the prompt (passages, question).

    Queries: the positions that produced each answer piece (the last prompt position
    through the one before the last piece). Per span, the attention mass from those
    queries (mean over layers, heads and queries of the weights summed over the span),
    its share among the spans named "passage ...", and the same from attention rollout
    (Abnar & Zuidema; the rows of those queries); per passage, its `top_tokens` pieces by
    mass.
    """
    ids = np.asarray(ids)
    if len(ids) <= prompt_length:
        raise ValueError("The answer is empty: no answer piece to explain")
    inputs = {}
    if prefix_mask is not None:
        inputs["prefix_mask"] = np.asarray(prefix_mask, bool)
    _, attentions = sown_attention(model, params, ids, None, **inputs)
    queries = np.arange(prompt_length - 1, len(ids) - 1)
    mass, per_key = attribution.span_attention_mass(attentions, queries, spans)
    rollout = attribution.attention_rollout(attentions)[queries].mean(0)
    passages = [n for n in spans if n.startswith("passage")]
    total = sum(mass[n] for n in passages) or 1.0
    rolled_total = sum(float(rollout[slice(*spans[n])].sum()) for n in passages) or 1.0
    report = {}
    for name, (start, end) in spans.items():
        entry = {"tokens": [start, end], "attention_mass": mass[name],
                 "rollout_mass": float(rollout[start:end].sum())}
        if name in passages:
            entry["share_of_passages"] = mass[name] / total
            entry["rollout_share_of_passages"] = entry["rollout_mass"] / rolled_total
            order = start + np.argsort(-per_key[start:end], kind="stable")[:top_tokens]
            entry["top_tokens"] = [
                {"position": int(p), "piece": tokenizer.id_to_piece(int(ids[p]))
                 if tokenizer is not None else int(ids[p]), "mass": float(per_key[p])}
                for p in order]
        report[name] = entry
    return {"spans": report, "per_key_mass": [float(x) for x in per_key],
            "rollout": [float(x) for x in rollout],
            "queries": [int(q) for q in queries],
            "layers": int(attentions.shape[0]), "heads": int(attentions.shape[1])}
