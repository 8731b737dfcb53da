"""UniLM's mix in MLM pre-training (data.prefix_lm_fraction; train/tasks/unilm.py): the
batch fields against a loop-by-loop reference, the combined loss against numpy, the
packed prefix-LM attention mask, and a short real run whose checkpoint a generator loads."""

import dataclasses
import json
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from configs import pretrain_mlm
from model.attention import make_attention_mask
from model.transformer import Model, resolve
from train import config_checks, loop, model_setup, objectives, tasks
from train.init_from import init_params_from
from train.tasks import masking, unilm

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
VOCAB = 50


class StubTokenizer:
    """What the mixing transform reads from a tokenizer."""

    vocab_size = VOCAB
    pad_id, unk_id, cls_id, sep_id, mask_id = PAD, UNK, CLS, SEP, MASK
    special_ids = (PAD, UNK, CLS, SEP, MASK)


def packed_batch(segment_lengths, L, seed=0):
    """Rows of packed `[CLS] pieces [SEP]` sequences (a 1-piece one is just [CLS])."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(segment_lengths), L), np.int32)
    segment_ids = np.zeros_like(tokens)
    for r, lengths in enumerate(segment_lengths):
        at = 0
        for s, n in enumerate(lengths, 1):
            tokens[r, at:at + n] = [CLS, *rng.integers(5, VOCAB, max(n - 2, 0)), SEP][:n]
            segment_ids[r, at:at + n] = s
            at += n
    return tokens, segment_ids


# Row 3 has a one-piece segment; row 1 is a single full-length sequence.
LENGTHS = [[6, 5, 3], [16], [2, 2, 7], [4, 1, 9]]


def reference_fields(tokens, segment_ids, lm_rows, draws, pad):
    """Per row, per segment, with loops: (prefix_mask, targets, target_weights, splits)."""
    prefix = segment_ids > 0
    targets = np.full(tokens.shape, pad)
    weights = np.zeros(tokens.shape)
    splits = {}
    for r in np.flatnonzero(lm_rows):
        prefix[r] = False
        for s in set(segment_ids[r].tolist()) - {0}:
            where = np.flatnonzero(segment_ids[r] == s)
            a, n = where[0], len(where)
            k = n if n < 2 else 1 + int(draws[r, a] * (n - 1))
            splits[r, s] = k
            prefix[r, a:a + k] = True
            for i in range(a, a + n - 1):
                targets[r, i] = tokens[r, i + 1]
                weights[r, i] = float(i + 1 >= a + k)  # The next piece is a continuation.
    return prefix, targets, weights, splits


# --- (1) The batch fields -------------------------------------------------------------


def test_prefix_lm_fields_match_reference():
    tokens, segment_ids = packed_batch(LENGTHS, 16)
    lm_rows = np.array([True, False, True, True])
    for seed in range(20):
        draws = np.random.default_rng(seed).random(tokens.shape)
        draws[0, 0], draws[2, 4] = 0.0, 1 - 1e-12  # The extreme splits: 1 and n - 1.
        got = unilm.prefix_lm_fields(tokens, segment_ids, lm_rows, draws, PAD)
        prefix, targets, weights, splits = reference_fields(tokens, segment_ids, lm_rows,
                                                            draws, PAD)
        np.testing.assert_array_equal(got["prefix_mask"], prefix)
        np.testing.assert_array_equal(got["targets"], targets)
        np.testing.assert_array_equal(got["target_weights"], weights)
        assert got["targets"].dtype == np.int32 and got["target_weights"].dtype == np.float32
        for (r, s), k in splits.items():  # Non-empty prefix and continuation.
            n = int((segment_ids[r] == s).sum())
            assert (1 <= k <= n - 1) if n >= 2 else k == n
            assert got["target_weights"][r][segment_ids[r] == s].sum() == n - k
        assert splits[0, 1] == 1 and splits[2, 3] == 6
    # The masked-LM row: bidirectional over its real tokens, no LM targets.
    np.testing.assert_array_equal(got["prefix_mask"][1], segment_ids[1] > 0)
    assert got["target_weights"][1].sum() == 0 and (got["targets"][1] == PAD).all()
    # Never across segments, never padding: the last piece of a segment predicts nothing.
    last = np.ones_like(segment_ids, bool)
    last[:, :-1] = segment_ids[:, 1:] != segment_ids[:, :-1]
    assert got["target_weights"][last | (segment_ids == 0)].sum() == 0


def mixing(fraction, dynamic=True, **kw):
    info = masking.MaskingInfo.from_tokenizer(StubTokenizer())
    args = (info, 0.15, 4, False)
    kwargs = dict(fraction=fraction, pad_id=PAD)
    if dynamic:
        return unilm.DynamicMixing(*args, **kwargs)
    return unilm.StaticMixing(*args, seed=kw.get("seed", 5), **kwargs)


def test_mixed_rows_against_masking_and_reference():
    tokens, segment_ids = packed_batch(LENGTHS * 4, 16, seed=1)  # 16 rows.
    example_weight = np.ones(16, np.float32)
    example_weight[-1] = 0.0
    batch = {"tokens": tokens, "segment_ids": segment_ids, "example_weight": example_weight}
    out = mixing(0.5).random_map(batch, np.random.default_rng(7))
    rng = np.random.default_rng(7)  # The draws in the documented order.
    mask_draws, lm_draws = rng.random((3, *tokens.shape)), rng.random((2, *tokens.shape))
    starts = [np.flatnonzero(np.diff(segment_ids[r], prepend=0) > 0) for r in range(16)]
    lm_rows = np.array([lm_draws[0][r, starts[r]].sum() % 1 < 0.5 for r in range(16)])
    assert 0 < lm_rows.sum() < 16
    masked = masking.mask_tokens(tokens, segment_ids, rng=mask_draws,
                                 tokenizer_info=StubTokenizer(), max_predictions=4)
    prefix, targets, weights, _ = reference_fields(tokens, segment_ids, lm_rows,
                                                   lm_draws[1], PAD)
    weights[-1] = 0.0  # A weight-0 row predicts nothing.
    mlm_rows = ~lm_rows
    for key in ("tokens", "mlm_positions", "mlm_targets"):
        np.testing.assert_array_equal(out[key][mlm_rows], masked[key][mlm_rows], key)
    np.testing.assert_array_equal(out["mlm_weights"][mlm_rows],
                                  (masked["mlm_weights"] * example_weight[:, None])[mlm_rows])
    # Prefix-LM rows: uncorrupted, unmasked.
    np.testing.assert_array_equal(out["tokens"][lm_rows], tokens[lm_rows])
    assert not out["mlm_weights"][lm_rows].any() and not out["mlm_positions"][lm_rows].any()
    np.testing.assert_array_equal(out["prefix_mask"], prefix)
    np.testing.assert_array_equal(out["targets"], targets)
    np.testing.assert_array_equal(out["target_weights"], weights)
    assert out["mlm_weights"][:-1][mlm_rows[:-1]].sum() > 0 and weights.sum() > 0
    shapes = {k: v.shape for k, v in out.items()}
    again = mixing(0.5).random_map(batch, np.random.default_rng(8))  # Other rows...
    assert {k: v.shape for k, v in again.items()} == shapes  # ...the same shapes.


def stream(fraction, seed, dynamic=True, rows=32, batches=100):
    """An iterator of random packed batches through the mixing transform, as training."""
    rng = np.random.default_rng(0)
    data = []
    for _ in range(batches):
        lengths = [list(rng.integers(3, 9, 3)) for _ in range(rows)]  # Each has an MLM pick.
        tokens, segment_ids = packed_batch(lengths, 24, seed=int(rng.integers(1 << 30)))
        data.append({"tokens": tokens, "segment_ids": segment_ids})
    cfg = dict(mlm_rate=0.15, mlm_max_predictions=4, mlm_whole_word=False, seq_len=24,
               mlm_dynamic=dynamic, prefix_lm_fraction=fraction)
    ds = grain.MapDataset.source(data).to_iter_dataset()
    return iter(unilm.add_prefix_lm_mixing(ds, StubTokenizer(), ml_collections.ConfigDict(cfg),
                                           seed=seed))


def lm_rows_of(batch):
    return batch["target_weights"].sum(1) > 0  # Every row here has a 2+ piece segment.


@pytest.mark.parametrize("dynamic", [True, False])
def test_fraction_of_rows_and_determinism(dynamic):
    batches = list(stream(0.3, seed=1, dynamic=dynamic))
    fraction = np.mean([lm_rows_of(b) for b in batches])
    assert abs(fraction - 0.3) < 0.04, fraction  # 3200 rows: 4.4 standard deviations.
    for b in batches[:5]:  # Exactly the rows with no masked-LM predictions.
        np.testing.assert_array_equal(lm_rows_of(b), b["mlm_weights"].sum(1) == 0)
    same = list(stream(0.3, seed=1, dynamic=dynamic))
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(batches, same) for k in a)
    other = list(stream(0.3, seed=2, dynamic=dynamic, batches=10))
    assert not all(np.array_equal(lm_rows_of(a), lm_rows_of(b))
                   for a, b in zip(batches, other))


def test_resume_mixes_as_uninterrupted():
    it = stream(0.5, seed=3, batches=12)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(6)]
    resumed = stream(0.5, seed=3, batches=12)
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(6)], strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_static_choice_follows_the_row_content():
    tokens, segment_ids = packed_batch(LENGTHS * 4, 16, seed=2)
    batch = {"tokens": tokens, "segment_ids": segment_ids}
    out = mixing(0.5, dynamic=False).map(batch)
    order = np.random.default_rng(0).permutation(16)
    moved = mixing(0.5, dynamic=False).map({k: v[order] for k, v in batch.items()})
    for key in out:
        np.testing.assert_array_equal(moved[key], out[key][order], key)
    assert 0 < lm_rows_of(out).sum() < 16


def test_eval_batches_are_pure_masked_lm():
    tokens, segment_ids = packed_batch(LENGTHS, 16)
    out = unilm._Bidirectional(PAD).map({"tokens": tokens, "segment_ids": segment_ids})
    np.testing.assert_array_equal(out["prefix_mask"], segment_ids > 0)
    assert out["target_weights"].sum() == 0 and (out["targets"] == PAD).all()


# --- (2) The combined loss ------------------------------------------------------------


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_combined_loss_is_both_cross_entropies():
    rng = np.random.default_rng(0)
    B, P, L, V = 3, 4, 6, 11
    mlm_logits, lm_logits = rng.normal(size=(B, P, V)), rng.normal(size=(B, L, V))
    batch = {"mlm_targets": rng.integers(0, V, (B, P)),
             "mlm_weights": (rng.random((B, P)) < 0.6).astype(np.float32),
             "targets": rng.integers(0, V, (B, L)),
             "target_weights": (rng.random((B, L)) < 0.5).astype(np.float32)}
    objective = objectives.MaskedAndPrefixLM()
    loss_sum, weight, sums = jax.jit(objective.loss)(
        {"mlm": jnp.asarray(mlm_logits), "lm": jnp.asarray(lm_logits)},
        jax.tree_util.tree_map(jnp.asarray, batch))

    def part(logits, targets, weights):
        nll = -np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0]
        right = (logits.argmax(-1) == targets) * weights
        return (nll * weights).sum(), weights.sum(), right.sum()

    mlm = part(mlm_logits, batch["mlm_targets"], batch["mlm_weights"])
    lm = part(lm_logits, batch["targets"], batch["target_weights"])
    np.testing.assert_allclose(loss_sum, mlm[0] + lm[0], rtol=1e-5)
    np.testing.assert_allclose(weight, mlm[1] + lm[1])
    report = objective.finalize({"loss_sum": loss_sum, "weight": weight,
                                 **jax.tree_util.tree_map(np.asarray, sums)})
    np.testing.assert_allclose(report["loss"], (mlm[0] + lm[0]) / (mlm[1] + lm[1]), rtol=1e-5)
    np.testing.assert_allclose(report["mlm_loss"], mlm[0] / mlm[1], rtol=1e-5)
    np.testing.assert_allclose(report["lm_loss"], lm[0] / lm[1], rtol=1e-5)
    np.testing.assert_allclose(report["mlm_accuracy"], mlm[2] / mlm[1], rtol=1e-6)
    np.testing.assert_allclose(report["lm_accuracy"], lm[2] / lm[1], rtol=1e-6)
    np.testing.assert_allclose(report["accuracy"], (mlm[2] + lm[2]) / (mlm[1] + lm[1]))
    step = objective.step_metrics(sums)
    np.testing.assert_allclose(step["lm_loss"], report["lm_loss"], rtol=1e-6)

    config = pretrain_mlm.get_config("runlocal,unilm=0.5")
    assert isinstance(tasks.get_task(config.task).objective(config), objectives.MaskedAndPrefixLM)
    config = pretrain_mlm.get_config("runlocal")
    assert isinstance(tasks.get_task(config.task).objective(config), objectives.MaskedLM)


# --- (3) The attention of a packed prefix-LM row --------------------------------------


def test_packed_prefix_lm_attention_mask():
    tokens, segment_ids = packed_batch(LENGTHS, 16)
    lm_rows = np.array([True, True, True, True])
    draws = np.random.default_rng(3).random(tokens.shape)
    fields = unilm.prefix_lm_fields(tokens, segment_ids, lm_rows, draws, PAD)
    _, _, _, splits = reference_fields(tokens, segment_ids, lm_rows, draws, PAD)
    got = np.asarray(make_attention_mask(jnp.asarray(segment_ids), "prefix",
                                         jnp.asarray(fields["prefix_mask"])))[:, 0]
    want = np.zeros_like(got)
    for r in range(len(tokens)):
        for i in range(16):
            for j in range(16):
                s = segment_ids[r, i]
                if s == 0 or segment_ids[r, j] != s:
                    continue  # Padding attends to nothing; nothing crosses segments.
                start = np.flatnonzero(segment_ids[r] == s)[0]
                in_prefix = j - start < splits[r, s]
                want[r, i, j] = in_prefix or j <= i  # Prefix: bidirectional; rest causal.
    np.testing.assert_array_equal(got, want)


def test_model_sees_only_its_segment_prefix_and_past():
    """Changing one piece changes the outputs exactly where the mask says it may."""
    config = pretrain_mlm.get_config("runlocal,unilm=0.5")
    config.model.update(vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0)
    model = Model(resolve(config.model))
    tokens, segment_ids = packed_batch([[6, 5, 3]], 16)
    positions = np.where(segment_ids > 0, np.arange(16) - np.array([0] * 6 + [6] * 5
                                                                    + [11] * 3 + [0] * 2), 0)
    prefix_mask = np.zeros_like(segment_ids, bool)
    prefix_mask[0, [0, 1, 2, 6, 7, 11]] = True  # Splits 3, 2, 1.
    inputs = dict(segment_ids=segment_ids, positions=positions, prefix_mask=prefix_mask)
    params = jax.jit(lambda key: nn.unbox(model.init(key, tokens, **inputs)["params"]))(
        jax.random.key(0))

    @jax.jit
    def apply(t):
        return model.apply({"params": params}, t, heads=(), **inputs)["hidden"][0]

    def hidden(t):
        return np.asarray(apply(t))

    base = hidden(tokens)
    for changed, affected in ((1, range(0, 6)),  # A prefix piece: its whole segment.
                              (4, range(4, 6)),  # A continuation piece: itself, then on.
                              (7, range(6, 11))):
        other = tokens.copy()
        other[0, changed] = 5 + (tokens[0, changed] - 4) % (VOCAB - 5)
        moved = np.abs(hidden(other) - base).max(-1) > 1e-6
        want = np.zeros(16, bool)
        want[list(affected)] = True
        np.testing.assert_array_equal(moved[segment_ids[0] > 0], want[segment_ids[0] > 0])


# --- (4) A real run, the start-up checks and the generator's init --------------------


@pytest.mark.slow
def test_unilm_run_both_losses_fall_and_generator_loads(wordnet_data_dir, tmp_path):
    config = pretrain_mlm.get_config("runlocal,unilm=0.5")
    config.data.data_dir = str(wordnet_data_dir)
    config.train.update(dict(num_steps=100, log_every=10, eval_every=100, checkpoint_every=100,
                             eval_steps=2, final_eval_steps=2, progress=False))
    config_checks.validate(config)
    workdir = str(tmp_path / "unilm")
    results = loop.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    first, last = records[0], records[-1]
    for part in ("mlm", "lm"):
        assert last[f"train/{part}_loss"] < first[f"train/{part}_loss"] - 0.3, part
    # Held-out evaluation stays masked-LM only, as without prefix-LM rows.
    assert results["validation"]["loss"] == pytest.approx(results["validation"]["mlm_loss"],
                                                          rel=1e-6)
    assert "lm_loss" not in results["validation"]

    # A prefix-LM generator of the same size and vocabulary starts from it.
    generator = config.copy_and_resolve_references()
    generator.task, generator.model.heads = "prefix_lm", ("lm",)
    generator.data.prefix_lm_fraction = 0.0
    model = model_setup.build_model(generator)
    tokens, segment_ids = packed_batch([[6, 5, 3]], generator.data.seq_len)
    fresh = jax.jit(lambda key: nn.unbox(model.init(
        key, tokens, heads=("lm",), **model_setup.init_inputs(model, tokens))["params"]))(
        jax.random.key(1))
    params, report = init_params_from(workdir, fresh)
    assert report["loaded"] and all(n.startswith("encoder/") for n in report["loaded"])
    assert not report["initialised"]  # The generator's "lm" head is the tied embedding.
    assert report["dropped"] and all(n.startswith("mlm_head/") for n in report["dropped"])
    logits = jax.jit(model.apply)({"params": params}, tokens, segment_ids=segment_ids,
                                  prefix_mask=segment_ids > 0)["lm"]
    assert logits.shape == (1, generator.data.seq_len, generator.model.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()


def test_config_checks_name_the_keys():
    validate = config_checks.validate
    validate(pretrain_mlm.get_config("runlocal,unilm=0.33"))
    validate(pretrain_mlm.get_config("runlocal"))
    config = pretrain_mlm.get_config("runlocal,unilm=0.33")
    config.model.attention_mask = "bidirectional"
    with pytest.raises(ValueError, match=r"config\.data\.prefix_lm_fraction=0\.33 needs "
                                         r"config\.model\.attention_mask='prefix'"):
        validate(config)
    config = pretrain_mlm.get_config("runlocal,unilm=0.33")
    config.model.heads = ("mlm",)
    with pytest.raises(ValueError, match=r"config\.model\.heads with 'mlm' and 'lm'"):
        validate(config)
    for bad in (1.0, -0.1):
        config = pretrain_mlm.get_config("runlocal,unilm=0.33")
        config.data.prefix_lm_fraction = bad
        with pytest.raises(ValueError, match=r"config\.data\.prefix_lm_fraction=.* \[0, 1\)"):
            validate(config)
    config = pretrain_mlm.get_config("runlocal")
    config.model.attention_mask = "prefix"
    with pytest.raises(ValueError, match=r"config\.data\.prefix_lm_fraction > 0"):
        validate(config)
    config = pretrain_mlm.get_config("runlocal,unilm=0.33")
    config.task = "classify"
    config.model.heads = ("classify", "mlm", "lm")
    with pytest.raises(ValueError, match=r"prefix_lm_fraction=0\.33 .* config\.task="):
        validate(config)


def test_config_keys_and_arguments():
    config = pretrain_mlm.get_config("unilm=0.33")
    assert config.data.prefix_lm_fraction == 0.33
    assert config.model.attention_mask == "prefix" and set(config.model.heads) == {"mlm", "lm"}
    plain = pretrain_mlm.get_config("")
    assert plain.data.prefix_lm_fraction == 0.0 and plain.model.attention_mask == "bidirectional"
    assert dataclasses.is_dataclass(objectives.MaskedAndPrefixLM())
