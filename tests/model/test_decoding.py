"""Decoding (model/decoding.py) against references that never touch the KV cache: the
compiled full-recompute decoder, a row-by-row eager loop over unpadded prompts, a numpy
beam search, numpy top-k/top-p filters and exhaustive search over a tiny vocabulary."""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import model_config
from model import decoding
from model.decoding import DecodeConfig
from model.transformer import Model, resolve

# Ragged right-padded prompts: lengths 6, 2 and 4 of a common 6 (pad 0 after them).
LENGTHS = np.array([6, 2, 4])
PROMPTS = np.where(np.arange(6)[None, :] < LENGTHS[:, None],
                   np.random.default_rng(0).integers(4, 97, (3, 6)), 0)


# The Llama family's options (SmolLM2's shape of choices) on the tiny model.
LLAMA = dict(norm_type="rmsnorm", mlp_activation="swiglu", num_kv_heads=2, use_bias=False,
             position_embedding="rope", rope_theta=100_000.0, tie_embeddings=False)


@functools.cache  # One Model object per shape: the compiled decoders are reused.
def tiny_model(vocab_size=97, mode="causal", perturb=False, **overrides):
    """A 2-layer, hidden-64 f32 model; init_std 0.5 makes its distributions sharp (no
    near-ties between cached and uncached argmaxes)."""
    cfg = resolve(model_config("tiny", vocab_size=vocab_size, max_len=24, dropout=0.0,
                               attention_dropout=0.0, heads=("lm",), norm="pre",
                               init_std=0.5, attention_mask=mode, **overrides))
    model = Model(cfg)
    tokens = jnp.ones((1, 4), jnp.int32)
    params = model.init(jax.random.key(0), tokens, prefix_mask=tokens > 0)["params"]
    if perturb:  # Away from the identity init, so that LoRA and the prefix matter.
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 0.1 if re.search("lora_b", str(path)) else x, params)
    return model, params


def next_log_probs(model, params, tokens, prompt_len):
    """Full forward over one sequence [len] -> log-probs [vocab] of the token after it
    (its first `prompt_len` tokens are the prefix in prefix-LM mode).

    The training layout: the sequence starts at slot 0, right-padded to max_len with
    segment 0, masks from segment ids; one compile per model.
    """
    slots = np.arange(model.cfg.max_len)
    padded = np.zeros(model.cfg.max_len, np.int32)
    padded[:len(tokens)] = tokens
    log_probs = _full_log_probs(model, params, padded[None], (slots < len(tokens))[None],
                                (slots < prompt_len)[None])
    return np.asarray(log_probs[0, len(tokens) - 1])


@functools.partial(jax.jit, static_argnums=0)
def _full_log_probs(model, params, tokens, segment_ids, prefix_mask):
    logits = model.apply({"params": params}, tokens, segment_ids=segment_ids.astype(int),
                         prefix_mask=prefix_mask)["lm"]
    return jax.nn.log_softmax(logits)


def eager_greedy(model, params, prompt, steps):
    """One row's greedy decoding: argmax of the full forward over the growing sequence."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(np.argmax(next_log_probs(model, params, tokens, len(prompt)))))
    return tokens[len(prompt):]


def decode(fn, model, params, config, rng=None, prompts=PROMPTS, lengths=LENGTHS):
    tokens, log_probs = fn(model, params, jnp.asarray(prompts), jnp.asarray(lengths),
                           config, rng)
    return np.asarray(tokens), np.asarray(log_probs)


@pytest.mark.parametrize("mode, peft", [
    ("causal", {}), ("prefix", {}), ("prefix", dict(position_embedding="rope")),
    ("causal", dict(lora_rank=2, lora_targets="query|key|value|out|wi|wo",
                    prefix_length=3)),
    ("causal", LLAMA),  # Grouped-query KV cache (2 kv heads of 4), untied head.
    ("causal", dict(LLAMA, lora_rank=2, lora_targets="query|value|gate", ia3=True,
                    prefix_length=3))])
def test_cached_greedy_equals_full_recompute(mode, peft):
    model, params = tiny_model(mode=mode, perturb=bool(peft), **peft)
    config = DecodeConfig(max_new_tokens=8, eos_id=None)
    cached, cached_lp = decode(decoding.generate, model, params, config)
    full, full_lp = decode(decoding.generate_without_cache, model, params, config)
    np.testing.assert_array_equal(cached, full)
    np.testing.assert_allclose(cached_lp, full_lp, rtol=1e-4)
    for row, length in enumerate(LENGTHS):  # Each row as if it were alone, unpadded.
        want = eager_greedy(model, params, PROMPTS[row, :length], 8)
        np.testing.assert_array_equal(cached[row], want)


@pytest.mark.parametrize("fn", [decoding.generate, decoding.generate_without_cache])
def test_prefix_lengths_leave_the_rest_of_the_prompt_causal(fn):
    """A prompt's tail past `prefix_lengths` (a forced answer) is read causally, as in
    training; continuing from a decoded start gives the rest of one-shot decoding."""
    model, params = tiny_model(mode="prefix")
    prefix = np.array([3, 2, 1])  # Of LENGTHS 6, 2, 4: tails 3, 0 (all prefix) and 3.
    tokens, log_probs = map(np.asarray, fn(
        model, params, jnp.asarray(PROMPTS), jnp.asarray(LENGTHS),
        DecodeConfig(max_new_tokens=5, eos_id=None), prefix_lengths=jnp.asarray(prefix)))
    for row, length in enumerate(LENGTHS):  # The training layout's mask, row alone.
        seq, want = list(PROMPTS[row, :length]), 0.0
        for step in range(5):
            step_log_probs = next_log_probs(model, params, seq, prefix[row])
            assert tokens[row, step] == np.argmax(step_log_probs)
            want += step_log_probs[tokens[row, step]]
            seq.append(int(tokens[row, step]))
        np.testing.assert_allclose(log_probs[row], want, rtol=1e-4)

    one_shot, _ = decode(fn, model, params, DecodeConfig(max_new_tokens=6, eos_id=None))
    forced = np.zeros((3, 8), np.int32)  # Each prompt, then its first 2 decoded tokens.
    for row, length in enumerate(LENGTHS):
        forced[row, :length + 2] = [*PROMPTS[row, :length], *one_shot[row, :2]]
    rest, _ = fn(model, params, jnp.asarray(forced), jnp.asarray(LENGTHS + 2),
                 DecodeConfig(max_new_tokens=4, eos_id=None),
                 prefix_lengths=jnp.asarray(LENGTHS))
    np.testing.assert_array_equal(np.asarray(rest), one_shot[:, 2:])


def test_cached_sampling_equals_full_recompute():
    model, params = tiny_model()
    config = DecodeConfig(strategy="sample", max_new_tokens=8, temperature=1.5, top_k=20,
                          top_p=0.9, eos_id=None)
    rng = jax.random.key(7)
    cached, _ = decode(decoding.generate, model, params, config, rng)
    full, _ = decode(decoding.generate_without_cache, model, params, config, rng)
    np.testing.assert_array_equal(cached, full)


def test_sampling_is_deterministic_given_the_key():
    model, params = tiny_model()
    config = DecodeConfig(strategy="sample", max_new_tokens=8, temperature=2.0, eos_id=None)
    first, _ = decode(decoding.generate, model, params, config, jax.random.key(1))
    again, _ = decode(decoding.generate, model, params, config, jax.random.key(1))
    other, _ = decode(decoding.generate, model, params, config, jax.random.key(2))
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


@pytest.mark.parametrize("sampling", [dict(temperature=1e-4), dict(temperature=0.0),
                                      dict(top_k=1), dict(top_p=1e-6)])
def test_degenerate_sampling_is_greedy(sampling):
    model, params = tiny_model()
    greedy, _ = decode(decoding.generate, model, params,
                       DecodeConfig(max_new_tokens=8, eos_id=None))
    config = DecodeConfig(strategy="sample", max_new_tokens=8, eos_id=None, **sampling)
    sampled, _ = decode(decoding.generate, model, params, config, jax.random.key(3))
    np.testing.assert_array_equal(sampled, greedy)


def test_eos_stops_a_row_and_pads_after_it():
    model, params = tiny_model()
    free, _ = decode(decoding.generate, model, params,
                     DecodeConfig(max_new_tokens=8, eos_id=None))
    eos = int(free[0, 2])  # A token row 0 emits at step 2: make it the EOS.
    stopped, log_probs = decode(decoding.generate, model, params,
                                DecodeConfig(max_new_tokens=8, eos_id=eos, pad_id=0))
    for row in range(len(LENGTHS)):
        hits = np.flatnonzero(free[row] == eos)
        end = hits[0] + 1 if len(hits) else 8
        np.testing.assert_array_equal(stopped[row, :end], free[row, :end])
        assert (stopped[row, end:] == 0).all()
    assert (stopped[0, 3:] == 0).all()
    # The log-prob counts tokens up to and including EOS only.
    prompt = list(PROMPTS[0, :LENGTHS[0]])
    want = sum(next_log_probs(model, params, prompt + list(free[0, :t]), len(prompt))[
        free[0, t]] for t in range(3))
    np.testing.assert_allclose(log_probs[0], want, rtol=1e-4)


@pytest.mark.parametrize("eos_step", [None, 2])
def test_beam_of_one_is_greedy(eos_step):
    model, params = tiny_model()
    eos = None
    if eos_step is not None:
        free, _ = decode(decoding.generate, model, params,
                         DecodeConfig(max_new_tokens=8, eos_id=None))
        eos = int(free[0, eos_step])
    greedy, greedy_lp = decode(decoding.generate, model, params,
                               DecodeConfig(max_new_tokens=8, eos_id=eos))
    beam, beam_lp = decode(decoding.generate, model, params,
                           DecodeConfig(strategy="beam", beam_size=1, max_new_tokens=8,
                                        eos_id=eos))
    np.testing.assert_array_equal(beam, greedy)
    np.testing.assert_allclose(beam_lp, greedy_lp, rtol=1e-5)


def test_beam_beats_greedy_and_is_bounded_by_exhaustive_search():
    vocab, steps = 6, 3
    model, params = tiny_model(vocab_size=vocab)
    prompts = np.array([[1, 0, 0, 0], [5, 4, 3, 2]])  # Beam beats greedy on row 0.
    lengths = np.array([1, 4])
    greedy, greedy_lp = decode(decoding.generate, model, params,
                               DecodeConfig(max_new_tokens=steps, eos_id=None),
                               prompts=prompts, lengths=lengths)
    config = DecodeConfig(strategy="beam", beam_size=3, max_new_tokens=steps, eos_id=None)
    beam, beam_lp = decode(decoding.generate, model, params, config, prompts=prompts,
                           lengths=lengths)
    for row, length in enumerate(lengths):
        # Every continuation's log-prob from one full forward pass (causal: no pad).
        continuations = np.array(list(itertools.product(range(vocab), repeat=steps)))
        prompt = np.broadcast_to(prompts[row, :length], (len(continuations), length))
        sequences = jnp.asarray(np.concatenate([prompt, continuations], axis=1))
        logits = model.apply({"params": params}, sequences)["lm"]
        log_probs = jax.nn.log_softmax(logits[:, length - 1:-1])
        totals = np.take_along_axis(np.asarray(log_probs), continuations[..., None],
                                    -1)[..., 0].sum(-1)
        found = np.flatnonzero((continuations == beam[row]).all(-1))[0]
        np.testing.assert_allclose(beam_lp[row], totals[found], rtol=1e-4)
        assert beam_lp[row] >= greedy_lp[row] - 1e-5
        assert beam_lp[row] <= totals.max() + 1e-5
    assert (beam_lp > greedy_lp + 1e-3).any()  # Beam search found something better.


def reference_beam_search(model, params, prompt, config):
    """Plain-Python beam search: every alive beam proposes every token; ranked by log p,
    EOS continuations among the first k join the finished list (best k by log p /
    ((5 + len) / 6) ** alpha), the k best non-EOS ones stay alive; stop when no alive beam
    can beat the worst finished one; at the end alive beams compete at their length."""
    k, n, eos = config.beam_size, config.max_new_tokens, config.eos_id

    def penalty(length):
        return ((5.0 + length) / 6.0) ** config.length_penalty

    alive, finished = [((), 0.0)], []  # (tokens, log p); (score, tokens, log p).
    for step in range(n):
        candidates = []
        for tokens, log_prob in alive:
            scores = next_log_probs(model, params, list(prompt) + list(tokens), len(prompt))
            candidates += [(tokens + (t,), log_prob + float(s)) for t, s in enumerate(scores)]
        candidates = sorted(candidates, key=lambda c: -c[1])
        finished += [(lp / penalty(step + 1), t, lp) for t, lp in candidates[:k]
                     if t[-1] == eos]
        alive = [c for c in candidates if c[0][-1] != eos][:k]
        finished = sorted(finished, key=lambda f: -f[0])[:k]
        if len(finished) == k and finished[-1][0] > alive[0][1] / penalty(n):
            break
    pool = finished + [(lp / penalty(len(t)), t, lp) for t, lp in alive]
    return sorted(pool, key=lambda f: -f[0])[:k]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_matches_python_reference(length_penalty):
    model, params = tiny_model(vocab_size=8)
    prompts = np.array([[5, 6, 7, 4, 2], [7, 4, 0, 0, 0], [2, 2, 6, 0, 0]])
    lengths = np.array([5, 2, 3])
    config = DecodeConfig(strategy="beam", beam_size=3, max_new_tokens=5, eos_id=3,
                          length_penalty=length_penalty)
    tokens, scores, log_probs = decoding.beam_search(
        model, params, jnp.asarray(prompts), jnp.asarray(lengths), config)
    saw_eos = False
    for row, length in enumerate(lengths):
        want = reference_beam_search(model, params, prompts[row, :length], config)
        for beam, (score, seq, log_prob) in enumerate(want):
            padded = np.zeros(5, int)
            padded[:len(seq)] = seq
            np.testing.assert_array_equal(tokens[row, beam], padded)
            np.testing.assert_allclose(scores[row, beam], score, rtol=1e-4)
            np.testing.assert_allclose(log_probs[row, beam], log_prob, rtol=1e-4)
            saw_eos |= 3 in seq
    assert saw_eos  # The test exercises the finished pool.


def reference_top_p(logits, p):
    out = np.full_like(logits, -np.inf)
    for row in range(logits.shape[0]):
        probs = np.exp(logits[row] - logits[row].max())
        probs /= probs.sum()
        mass = 0.0
        for token in np.argsort(-logits[row], kind="stable"):
            out[row, token] = logits[row, token]
            mass += probs[token]
            if mass >= p:
                break
    return out


@pytest.mark.parametrize("p", [0.05, 0.3, 0.75, 0.999])
def test_top_p_filter_matches_numpy_reference(p):
    logits = np.random.default_rng(1).normal(size=(4, 50)).astype(np.float32) * 2
    got = decoding.top_p_filter(jnp.asarray(logits), p)
    np.testing.assert_array_equal(np.asarray(got), reference_top_p(logits, p))


def test_top_k_filter_keeps_the_k_largest():
    logits = np.random.default_rng(2).normal(size=(4, 50)).astype(np.float32)
    got = np.asarray(decoding.top_k_filter(jnp.asarray(logits), 5))
    for row in range(4):
        kept = np.flatnonzero(np.isfinite(got[row]))
        np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-logits[row])[:5]))
        np.testing.assert_array_equal(got[row, kept], logits[row, kept])


def test_sampled_tokens_stay_inside_the_filters():
    model, params = tiny_model()
    config = DecodeConfig(strategy="sample", max_new_tokens=6, top_k=3, eos_id=None)
    sampled, _ = decode(decoding.generate, model, params, config, jax.random.key(4))
    for row, length in enumerate(LENGTHS):  # Each token was among its step's top 3.
        tokens = list(PROMPTS[row, :length])
        for token in sampled[row]:
            top3 = np.argsort(-next_log_probs(model, params, tokens, length))[:3]
            assert token in top3
            tokens.append(token)


def test_prompt_too_long_is_a_clear_error():
    model, params = tiny_model()  # max_len 24.
    prompts = jnp.ones((2, 20), jnp.int32)
    with pytest.raises(ValueError, match="config.model.max_len=24"):
        decoding.generate(model, params, prompts, jnp.array([20, 3]),
                          DecodeConfig(max_new_tokens=8))


def test_bidirectional_model_cannot_decode_and_bad_configs_fail():
    model, params = tiny_model(mode="bidirectional")
    with pytest.raises(ValueError, match="attention_mask='bidirectional'"):
        decode(decoding.generate, model, params, DecodeConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="DecodeConfig.top_p"):
        DecodeConfig(strategy="sample", top_p=0.0)
    with pytest.raises(ValueError, match="DecodeConfig.strategy"):
        DecodeConfig(strategy="contrastive")
