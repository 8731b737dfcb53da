"""Autoregressive decoding with the KV cache: greedy, sampling (temperature, top-k, top-p)
and beam search, each one compiled `jax.lax.while_loop` over a batch.

Layout. Prompts arrive right-padded (tokens, then pad: what the data pipeline writes) with
their lengths, and are left-aligned here to the batch's common length P. Every row's last
prompt token then sits at cache slot P - 1 and each step writes slot P + s - 1 for all rows
at once, so the attention layers' cache index stays one scalar. A row's positions start at
0 on its first real token, and its pad slots are never visible as keys, so a row decodes
as if it were alone. P + max_new_tokens must fit in `cfg.max_len` (the position table);
the cache is allocated with only the P + max_new_tokens - 1 slots a call writes (the
attention layer takes the cache it is given), so each step reads no empty slots.

The prompt is processed once (one `decode=True` forward over [batch, P], bidirectional
over the prompt for `attention_mask="prefix"`, causal otherwise), then one token per step.
`prefix_lengths` makes only the start of each prompt bidirectional: the rest is an answer
already begun (forced), read causally, so decoding can stop, change the prefix (RAG's
re-retrieval, retrieval/rag.py) and go on where it stopped.
`generate_without_cache` re-runs the full forward over the growing sequence instead: the
reference the cache is tested against and the benchmark's baseline.

Works with LoRA, (IA)^3, adapters and prefix tuning (prefix keys join after the cache,
model/attention.py); prompt tuning (`prompt_length`) does not support decoding.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

STRATEGIES = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to decode (hashable: a static argument of the compiled loops)."""

    strategy: str = "greedy"  # "greedy" | "sample" | "beam".
    max_new_tokens: int = 32
    temperature: float = 1.0  # "sample": logits / temperature; 0 is greedy.
    top_k: int = 0  # "sample": only the k most likely tokens; 0 = all.
    top_p: float = 1.0  # "sample": the smallest set of tokens with mass >= top_p; 1 = all.
    beam_size: int = 4
    # "beam": a finished beam scores log p / ((5 + length) / 6) ** length_penalty (Wu et al.
    # 2016, GNMT); 0 ranks by total log-probability. Length counts generated tokens.
    length_penalty: float = 0.0
    eos_id: int | None = 3  # [SEP] (train/data/tokenizer.py); None: rows never stop early.
    pad_id: int = 0  # Emitted after a row's EOS.

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"DecodeConfig.strategy={self.strategy!r}; expected one of "
                             f"{STRATEGIES}")
        if self.max_new_tokens < 1:
            raise ValueError(f"DecodeConfig.max_new_tokens={self.max_new_tokens}; expected >= 1")
        if self.temperature < 0:
            raise ValueError(f"DecodeConfig.temperature={self.temperature}; expected >= 0")
        if self.top_k < 0:
            raise ValueError(f"DecodeConfig.top_k={self.top_k}; expected >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"DecodeConfig.top_p={self.top_p}; expected in (0, 1]")
        if self.beam_size < 1:
            raise ValueError(f"DecodeConfig.beam_size={self.beam_size}; expected >= 1")
        # Negative values would reward length without bound and break early stopping.
        if self.length_penalty < 0:
            raise ValueError(f"DecodeConfig.length_penalty={self.length_penalty}; "
                             f"expected >= 0")


# ----------------------------------------------------------------------------------------
# Token selection.
# ----------------------------------------------------------------------------------------


def top_k_filter(logits, k):
    """logits [..., vocab] with all but the k largest set to -inf (ties at the k-th kept)."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits, p):
    """Nucleus filter (Holtzman et al. 2020): logits [..., vocab] keeping the smallest set
    of most likely tokens whose probability reaches p (ties at the cut kept), -inf else."""
    if p >= 1.0:
        return logits
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The top token always stays: its mass_before is 0 < p.
    kept = jnp.sum(mass_before < p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def select_tokens(logits, rng, config):
    """Next tokens [batch] from logits [batch, vocab]: argmax, or a sample under the
    config's temperature, top-k and top-p."""
    if config.strategy == "greedy" or config.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / config.temperature
    logits = top_p_filter(top_k_filter(logits, config.top_k), config.top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------
# Prompt layout, cache masks and the two forward passes.
# ----------------------------------------------------------------------------------------


def left_align(prompts, prompt_lengths, pad_id):
    """Right-padded prompts [batch, P] -> left-padded [batch, P] and pad counts [batch].

    Row b's `prompt_lengths[b]` (>= 1) tokens move to the end; the slots before them
    hold `pad_id`.
    """
    length = prompts.shape[1]
    pads = length - prompt_lengths.astype(jnp.int32)
    source = (jnp.arange(length)[None, :] - pads[:, None]) % length
    aligned = jnp.take_along_axis(prompts, source, axis=1)
    is_pad = jnp.arange(length)[None, :] < pads[:, None]
    return jnp.where(is_pad, pad_id, aligned).astype(jnp.int32), pads


def _check(model, prompts, config):
    cfg = model.cfg
    if cfg.attention_mask not in ("causal", "prefix"):
        raise ValueError(f"config.model.attention_mask={cfg.attention_mask!r} cannot decode; "
                         f"expected 'causal' or 'prefix'")
    total = prompts.shape[1] + config.max_new_tokens
    if total > cfg.max_len:
        raise ValueError(
            f"A prompt of {prompts.shape[1]} tokens plus max_new_tokens="
            f"{config.max_new_tokens} is {total} tokens, more than config.model.max_len="
            f"{cfg.max_len} (the position table); shorten the prompt or "
            f"generate fewer tokens")
    if config.strategy == "beam" and config.beam_size > cfg.vocab_size - 1:
        raise ValueError(f"DecodeConfig.beam_size={config.beam_size} needs at least "
                         f"beam_size + 1 tokens in the vocabulary ({cfg.vocab_size})")


def _last_logits(module, tokens, *, positions, attention_mask=None, segment_ids=None,
                 prefix_mask=None, last=None, decode):
    """Model.apply method: the tied LM head only where the next token is read.

    `last` [batch] picks each row's slot (default: the final one); logits [batch, vocab].
    Skipping the head elsewhere saves a [batch, seq, vocab] matmul per step.
    """
    hidden = module.encoder(tokens, positions=positions, attention_mask=attention_mask,
                            segment_ids=segment_ids, prefix_mask=prefix_mask, decode=decode)
    if last is None:
        picked = hidden[:, -1]
    else:
        picked = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return module.lm_logits(picked).astype(jnp.float32)


def _empty_cache(model, batch, slots):
    """The zeroed "cache" collection for `batch` rows: K/V [batch, kv_heads, slots, dim]."""
    # An explicit mask: the init pass attends over the one token it is given, and the
    # "prefix" mode would otherwise ask for a prefix_mask.
    shapes = jax.eval_shape(
        functools.partial(model.init, decode=True), jax.random.key(0),
        jnp.zeros((batch, 1), jnp.int32), attention_mask=jnp.ones((batch, 1, 1, 1), bool),
    )["cache"]
    return jax.tree.map(
        lambda s: jnp.zeros((batch, s.shape[1], slots, s.shape[3]) if s.ndim else s.shape,
                            s.dtype),
        shapes)


def _cache_slots(cache):
    return max(x.shape[2] for x in jax.tree.leaves(cache) if x.ndim)


def _prefix_ends(length, prompt_lengths, prefix_lengths):
    """The slot [batch] where each left-aligned row's bidirectional prefix ends: the whole
    prompt (`length`) unless `prefix_lengths` leaves a causal tail (a forced answer)."""
    if prefix_lengths is None:
        return jnp.full(prompt_lengths.shape, length, jnp.int32)
    return length - (prompt_lengths - prefix_lengths).astype(jnp.int32)


def _prefill(model, params, tokens, pads, prefix_ends, config):
    """One decode=True forward over the left-aligned prompts [batch, P]: fills cache slots
    [0, P) of a new cache [batch, P + N - 1, ...] and returns (logits of the first new
    token [batch, vocab], cache). In prefix-LM mode slots before `prefix_ends` [batch]
    see each other; the rest of the prompt, like the new tokens, is causal."""
    batch, length = tokens.shape
    slots = length + config.max_new_tokens - 1  # The last new token is never fed.
    query = jnp.arange(length)[:, None]
    key = jnp.arange(slots)[None, :]
    order = (key <= query)[None]
    if model.cfg.attention_mask == "prefix":  # The prefix sees itself whole.
        order = order | (key < prefix_ends[:, None, None])
    mask = order & (key >= pads[:, None, None])  # [batch, P, slots]
    positions = jnp.maximum(jnp.arange(length)[None, :] - pads[:, None], 0)
    cache = _empty_cache(model, batch, slots)
    logits, variables = model.apply(
        {"params": params, "cache": cache}, tokens, positions=positions,
        attention_mask=mask[:, None], decode=True, method=_last_logits, mutable=["cache"])
    return logits, variables["cache"]


def _decode_step(model, params, cache, tokens, slot, pads):
    """Feeds tokens [batch] at cache slot `slot` (a traced scalar): (logits [batch, vocab],
    cache). Keys are the row's real slots up to and including this one."""
    key = jnp.arange(_cache_slots(cache))[None, :]
    mask = (key >= pads[:, None]) & (key <= slot)  # [batch, slots]
    logits, variables = model.apply(
        {"params": params, "cache": cache}, tokens[:, None],
        positions=(slot - pads)[:, None], attention_mask=mask[:, None, None], decode=True,
        method=_last_logits, mutable=["cache"])
    return logits, variables["cache"]


# ----------------------------------------------------------------------------------------
# Greedy and sampling.
# ----------------------------------------------------------------------------------------


def _token_loop(first_logits, step_logits, state, config, rng):
    """The greedy/sampling loop, shared by the cached and uncached decoders.

    `first_logits` [batch, vocab] predict token 0; `step_logits(state, fed [batch], step)`
    -> (logits, state) predicts token `step` after feeding token `step - 1`. Returns
    tokens [batch, N] and each row's summed model log-probs (temperature 1, unfiltered)
    of its tokens up to EOS, [batch].
    """
    batch, n = first_logits.shape[0], config.max_new_tokens
    rng = jax.random.key(0) if rng is None else rng  # Unused by greedy.

    def emit(carry, logits, step):
        tokens, finished, log_prob, state = carry
        token = select_tokens(logits, jax.random.fold_in(rng, step), config)
        token = jnp.where(finished, config.pad_id, token)  # Finished rows emit pad.
        token_log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None],
                                             axis=-1)[:, 0]
        log_prob = log_prob + jnp.where(finished, 0.0, token_log_prob)
        if config.eos_id is not None:
            finished = finished | (token == config.eos_id)
        return tokens.at[:, step].set(token), finished, log_prob, state

    def cond(loop):
        step, (_, finished, _, _) = loop
        return (step < n) & ~jnp.all(finished)

    def body(loop):
        step, (tokens, finished, log_prob, state) = loop
        logits, state = step_logits(state, tokens[:, step - 1], step)
        return step + 1, emit((tokens, finished, log_prob, state), logits, step)

    carry = (jnp.full((batch, n), config.pad_id, jnp.int32), jnp.zeros((batch,), bool),
             jnp.zeros((batch,), jnp.float32), state)
    carry = emit(carry, first_logits, 0)
    _, (tokens, _, log_prob, _) = jax.lax.while_loop(cond, body, (jnp.array(1), carry))
    return tokens, log_prob


# ----------------------------------------------------------------------------------------
# Beam search.
# ----------------------------------------------------------------------------------------


def _length_penalty(length, alpha):
    return ((5.0 + length) / 6.0) ** alpha


def _beam_loop(model, params, cache, first_logits, prompt_len, pads, config):
    """Beam search over the prefilled cache ([batch] rows). Each step every alive beam
    proposes all tokens; of the continuations ranked by total log-prob, the EOS ones among
    the best `beam_size` join the finished pool (which keeps the best `beam_size` by
    length-penalised score) and the best `beam_size` non-EOS ones stay alive (their cache
    rows gathered from their parents). A row stops when no alive beam can still beat its
    worst finished one; at the end, alive beams compete with the finished at their
    current length.

    Returns tokens [batch, beam, N] (best first, pad after EOS), the ranking scores
    [batch, beam] and the total log-probs [batch, beam].
    """
    k, n = config.beam_size, config.max_new_tokens
    batch, vocab = first_logits.shape
    alpha = config.length_penalty
    # Beams are rows b * k + i of the cache; they all start from the prompt's cache.
    cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0) if x.ndim else x, cache)
    beam_pads = jnp.repeat(pads, k)
    rows = jnp.arange(batch)[:, None]

    def choose(carry, logits, step):
        """Extend beams with token `step` given logits [batch * k, vocab]."""
        seqs, log_prob, fin_seqs, fin_scores, fin_log_prob, cache = carry
        total = log_prob[:, :, None] + jax.nn.log_softmax(logits).reshape(batch, k, vocab)
        if config.eos_id is not None:
            # EOS ends a beam only where it ranks among the k best continuations of all
            # beams (as Hugging Face does): a beam of one is then greedy decoding.
            kth_best = jax.lax.top_k(total.reshape(batch, k * vocab), k)[0][:, -1:]
            ended = total[:, :, config.eos_id]  # [batch, k]
            ended = jnp.where(ended >= kth_best, ended, -jnp.inf)
            fin_seqs = jnp.concatenate(
                [fin_seqs, seqs.at[:, :, step].set(config.eos_id)], axis=1)
            fin_log_prob = jnp.concatenate([fin_log_prob, ended], axis=1)
            fin_scores = jnp.concatenate(
                [fin_scores, ended / _length_penalty(step + 1.0, alpha)], axis=1)
            fin_scores, best = jax.lax.top_k(fin_scores, k)
            fin_seqs, fin_log_prob = fin_seqs[rows, best], fin_log_prob[rows, best]
            total = total.at[:, :, config.eos_id].set(-jnp.inf)
        log_prob, flat = jax.lax.top_k(total.reshape(batch, k * vocab), k)
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        seqs = seqs[rows, parent].at[:, :, step].set(token)
        source = (rows * k + parent).reshape(-1)
        cache = jax.tree.map(lambda x: x[source] if x.ndim else x, cache)
        return seqs, log_prob, fin_seqs, fin_scores, fin_log_prob, cache

    def done(carry):
        _, log_prob, _, fin_scores, _, _ = carry
        if config.eos_id is None:
            return jnp.zeros((batch,), bool)
        # Log-probs only fall and the penalty only grows, so this bounds every alive
        # beam's final score (lengths <= n).
        best_possible = log_prob[:, 0] / _length_penalty(float(n), alpha)
        return fin_scores[:, -1] > best_possible

    def cond(loop):
        step, carry = loop
        return (step < n) & ~jnp.all(done(carry))

    def body(loop):
        step, carry = loop
        fed = carry[0][:, :, step - 1].reshape(-1)
        logits, cache = _decode_step(model, params, carry[-1], fed, prompt_len + step - 1,
                                     beam_pads)
        return step + 1, choose((*carry[:-1], cache), logits, step)

    # Only beam 0 is alive at first: the k copies of the prompt would propose the same.
    alive_log_prob = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)
    carry = (jnp.full((batch, k, n), config.pad_id, jnp.int32),
             jnp.broadcast_to(alive_log_prob, (batch, k)),
             jnp.full((batch, k, n), config.pad_id, jnp.int32),
             jnp.full((batch, k), -jnp.inf), jnp.full((batch, k), -jnp.inf), cache)
    carry = choose(carry, jnp.repeat(first_logits, k, axis=0), 0)
    steps, carry = jax.lax.while_loop(cond, body, (jnp.array(1), carry))
    seqs, log_prob, fin_seqs, fin_scores, fin_log_prob, _ = carry
    alive_scores = log_prob / _length_penalty(steps.astype(jnp.float32), alpha)
    scores, best = jax.lax.top_k(jnp.concatenate([fin_scores, alive_scores], axis=1), k)
    all_seqs = jnp.concatenate([fin_seqs, seqs], axis=1)[rows, best]
    all_log_prob = jnp.concatenate([fin_log_prob, log_prob], axis=1)[rows, best]
    return all_seqs, scores, all_log_prob


# ----------------------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "config"))
def beam_search(model, params, prompts, prompt_lengths, config, prefix_lengths=None):
    """All beams: tokens [batch, beam, N] best first, scores [batch, beam] (length-
    penalised, what ranks them) and total log-probs [batch, beam]. See `generate`."""
    _check(model, prompts, config)
    tokens, pads = left_align(prompts, prompt_lengths, config.pad_id)
    prefix_ends = _prefix_ends(tokens.shape[1], prompt_lengths, prefix_lengths)
    first_logits, cache = _prefill(model, params, tokens, pads, prefix_ends, config)
    return _beam_loop(model, params, cache, first_logits, tokens.shape[1], pads, config)


@functools.partial(jax.jit, static_argnames=("model", "config"))
def generate(model, params, prompts, prompt_lengths, config, rng=None, prefix_lengths=None):
    """Continues each prompt with up to `config.max_new_tokens` tokens, using the KV cache.

    Args:
      model: a `Model` (model/transformer.py) with a "causal" or "prefix" attention mask.
      params: its params (boxed or not).
      prompts: int [batch, P], right-padded: row b's prompt is prompts[b, :lengths[b]].
      prompt_lengths: int [batch], each >= 1 (a padding mask gives `mask.sum(-1)`).
      config: a DecodeConfig.
      rng: a PRNG key; "sample" draws token s with `fold_in(rng, s)`.
      prefix_lengths: int [batch], 1 <= prefix_lengths <= prompt_lengths ("prefix"
        models; default the whole prompt): how many of each prompt's tokens form the
        bidirectional prefix. The rest of the prompt is read causally, like generated
        tokens: an answer begun by an earlier call continues exactly as if decoded in
        one go (as in training, where the answer follows the prefix causally).
    Returns:
      tokens int [batch, N]: a row stops after its EOS and emits `pad_id` from then on;
      log_probs float32 [batch]: the model's total log-probability of each row's tokens up
        to and including EOS (for beam search, of the best beam).
    """
    _check(model, prompts, config)
    if config.strategy == "sample" and config.temperature > 0 and rng is None:
        raise ValueError("DecodeConfig.strategy='sample' needs an rng key")
    tokens, pads = left_align(prompts, prompt_lengths, config.pad_id)
    length = tokens.shape[1]
    prefix_ends = _prefix_ends(length, prompt_lengths, prefix_lengths)
    first_logits, cache = _prefill(model, params, tokens, pads, prefix_ends, config)
    if config.strategy == "beam":
        seqs, _, log_prob = _beam_loop(model, params, cache, first_logits, length, pads,
                                       config)
        return seqs[:, 0], log_prob[:, 0]

    def step_logits(cache, fed, step):
        return _decode_step(model, params, cache, fed, length + step - 1, pads)

    return _token_loop(first_logits, step_logits, cache, config, rng)


@functools.partial(jax.jit, static_argnames=("model", "config"))
def generate_without_cache(model, params, prompts, prompt_lengths, config, rng=None,
                           prefix_lengths=None):
    """`generate` (greedy or sampling) without the KV cache: every step re-runs the full
    forward (decode=False, masks from segment ids as in training) over a fixed buffer
    [batch, P + N] holding the prompt and the tokens so far; not-yet-written slots are
    padding (segment 0). Same outputs as `generate`; the cache's reference and baseline.
    """
    _check(model, prompts, config)
    if config.strategy == "beam":
        raise ValueError("generate_without_cache supports 'greedy' and 'sample'")
    aligned, pads = left_align(prompts, prompt_lengths, config.pad_id)
    batch, length = aligned.shape
    n = config.max_new_tokens
    slots = jnp.arange(length + n)[None, :]
    positions = jnp.maximum(slots - pads[:, None], 0)
    prefix_mask = None
    if model.cfg.attention_mask == "prefix":
        prefix_ends = _prefix_ends(length, prompt_lengths, prefix_lengths)
        prefix_mask = slots < prefix_ends[:, None]  # [batch, P + N]
    buffer = jnp.pad(aligned, ((0, 0), (0, n)), constant_values=config.pad_id)

    def full_forward(buffer, step):
        """Logits [batch, vocab] after the first length + step slots of the buffer."""
        segment_ids = ((slots >= pads[:, None]) & (slots < length + step)).astype(jnp.int32)
        return model.apply(
            {"params": params}, buffer, positions=positions, segment_ids=segment_ids,
            prefix_mask=prefix_mask, last=jnp.full((batch,), length + step - 1),
            decode=False, method=_last_logits)

    def step_logits(buffer, fed, step):
        buffer = jax.lax.dynamic_update_slice(buffer, fed[:, None], (0, length + step - 1))
        return full_forward(buffer, step), buffer

    return _token_loop(full_forward(buffer, 0), step_logits, buffer, config, rng)


def token_log_probs(model, params, sequences, bucket=64):
    """log p(token | the tokens before it) of every token after the first, per sequence
    (lists of ids): one teacher-forced forward, batched, padded to a multiple of `bucket`
    so that few lengths compile. -> [np.ndarray [len(s) - 1]]."""
    import numpy as np

    length = -(-max(len(s) for s in sequences) // bucket) * bucket
    tokens = np.zeros((len(sequences), length), np.int32)
    segments = np.zeros_like(tokens)
    for i, s in enumerate(sequences):
        tokens[i, :len(s)], segments[i, :len(s)] = s, 1
    out = np.asarray(_score(model, params, tokens, segments))
    return [out[i, :len(s) - 1] for i, s in enumerate(sequences)]


@functools.partial(jax.jit, static_argnums=0)
def _score(model, params, tokens, segment_ids):
    logits = model.apply({"params": params}, tokens, segment_ids=segment_ids)["lm"]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    return jnp.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
