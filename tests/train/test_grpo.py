"""GRPO (task "grpo", train/post_training/): the objective against numpy on a hand-made
group, the reference policy (adapter off: KL 0 at step 0), a tiny run on a toy
verifiable task raising the mean reward, kill-and-resume bitwise, start-up errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rag
from launch import run_task
from train import config_checks
from train.post_training import grpo, logprobs, rewards, rollout
from train.post_training import run as post_run
from train.tasks import prefix_lm_examples

WORDS = ["yes", "no", "red", "blue", "cat", "dog", "say", "the", "word", "please"]


def toy_setup(tmp_path, task="grpo", method="full"):
    """A tiny decoder over a 15-piece WordPiece vocabulary; every question asks for
    "yes" (reward: gold contained): a random policy says it ~1 time in 4 over 4 tokens."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    qa = tmp_path / "qa"
    rows = [{"question": f"say the word {w}", "passages": [f"{w} please"], "answer": "yes"}
            for w in WORDS[1:]]
    for split in ("train", "validation", "test"):
        prefix_lm_examples.write_split(str(qa), split, rows)
    c = rag.get_config("runlocal")
    c.task = task
    c.model.update(num_layers=1, hidden=32, num_heads=2, mlp_dim=64, vocab_size=16,
                   max_len=32, attention_mask="causal", dropout=0.0, attention_dropout=0.0)
    if method == "lora":
        c.model.update(lora_rank=4, lora_alpha=8.0, lora_targets="query|value")
        c.optim.param_rules = ((".*/lora_[ab]", 1.0), (".*", 0.0))
    c.data.update(tokenizer="wordpiece", tokenizer_path=str(vocab), qa_dir=str(qa),
                  seq_len=32, batch_size=2, eval_batch_size=9)
    c.optim.update(lr=3e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
    c.post_train.update(reward="gold_contained", format_reward=0.0, group_size=8,
                        prompts_per_step=2, max_new_tokens=4, kl_coef=0.01, eval_questions=9)
    c.train.update(num_steps=4, log_every=1, eval_every=1000, checkpoint_every=2,
                   progress=False)
    return c


# --- The objective ------------------------------------------------------------------------

def numpy_grpo(lp, old, ref, adv, mask, eps, beta):
    """The objective written out in numpy, row by row."""
    losses, kls, binds, n = [], [], 0, 0
    for i in range(lp.shape[0]):
        terms = []
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            ratio = np.exp(lp[i, t] - old[i, t])
            a, b = ratio * adv[i], np.clip(ratio, 1 - eps, 1 + eps) * adv[i]
            kl = np.exp(ref[i, t] - lp[i, t]) - (ref[i, t] - lp[i, t]) - 1
            terms.append(-min(a, b) + beta * kl)
            kls.append(kl)
            binds += b < a
            n += 1
        if terms:
            losses.append(np.mean(terms))
    return np.mean(losses), np.mean(kls), binds / n


def test_group_advantages_and_objective_match_numpy():
    rewards_ = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 0.0]])
    adv = grpo.group_advantages(rewards_)
    for g, r in zip(adv, rewards_):
        np.testing.assert_allclose(g, (r - r.mean()) / (np.std(r, ddof=1) + 1e-6), rtol=1e-6)
    assert np.all(adv[1] == 0)  # A group without spread gives no signal.

    rng = np.random.default_rng(0)
    rows, seq = 12, 7
    lp = rng.normal(-2, 0.5, (rows, seq)).astype(np.float32)
    old = (lp + rng.normal(0, 0.4, (rows, seq))).astype(np.float32)  # Ratios beyond 1±ε.
    ref = (lp + rng.normal(0, 0.3, (rows, seq))).astype(np.float32)
    mask = (rng.random((rows, seq)) < 0.7).astype(np.float32)
    mask[3] = 0  # A row without completion tokens counts for nothing.
    flat_adv = adv.reshape(-1)
    loss, metrics = grpo.grpo_loss(jnp.asarray(lp), jnp.asarray(old), jnp.asarray(ref),
                                   jnp.asarray(flat_adv), jnp.asarray(mask), clip_eps=0.2,
                                   kl_coef=0.05)
    want, want_kl, want_clip = numpy_grpo(lp, old, ref, flat_adv, mask, 0.2, 0.05)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), want_kl, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["clip_fraction"]), want_clip, rtol=1e-6)
    assert 0 < want_clip < 1  # The hand-made group exercises the clip.


# --- The reference ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_pieces(tmp_path_factory):
    from train import trainer as trainer_lib

    config = toy_setup(tmp_path_factory.mktemp("lora"), method="lora")
    setup = trainer_lib.abstract_setup(config)
    from train import model_setup
    params = model_setup.init_train_state(setup.model, setup.tx, 32, 0, None).params
    return config, setup.model, params


def test_adapter_off_reference_equals_the_policy_at_step_0(lora_pieces):
    config, model, params = lora_pieces
    ref_model, ref_params = logprobs.make_reference(model, params)
    assert ref_params is None and ref_model.cfg.lora_rank == 0  # No second copy.
    batch = rollout.update_batch([[2, 7, 5], [2, 9]], [[5, 6, 3], [8, 3]], 12, 0)
    policy = logprobs.token_log_probs(model, params, batch)
    reference = logprobs.reference_token_log_probs(ref_model, None, params, batch)
    np.testing.assert_array_equal(np.asarray(policy), np.asarray(reference))  # B = 0.
    kl = grpo.k3_kl(policy, reference) * batch["completion_mask"]
    assert float(jnp.sum(kl)) == 0.0
    # Once B moves, the policy leaves the reference (the adapter was really off).
    moved = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.5 if "lora_b" in jax.tree_util.keystr(p) else x, params)
    moved_lp = logprobs.token_log_probs(model, moved, batch)
    assert not np.allclose(np.asarray(moved_lp), np.asarray(reference), atol=1e-4)
    np.testing.assert_array_equal(  # The reference still reads the base weights only.
        np.asarray(logprobs.reference_token_log_probs(ref_model, None, moved, batch)),
        np.asarray(reference))


def test_full_fine_tuning_reference_is_a_frozen_copy(lora_pieces):
    import dataclasses

    from model.transformer import Model

    _, model, params = lora_pieces
    plain = Model(dataclasses.replace(model.cfg, lora_rank=0))  # No PEFT module.
    ref_model, ref_params = logprobs.make_reference(plain, params)
    assert ref_model is plain
    leaves, copies = jax.tree.leaves(params), jax.tree.leaves(ref_params)
    assert all(np.array_equal(a, b) and a is not b for a, b in zip(leaves, copies))


def test_completion_log_probs_cover_completion_tokens_only(lora_pieces):
    _, model, params = lora_pieces
    batch = rollout.update_batch([[2, 7, 5]], [[6, 3]], 8, 0)
    token_lp = logprobs.token_log_probs(model, params, batch)
    logits = model.apply({"params": params}, jnp.asarray(batch["tokens"]),
                         segment_ids=batch["segment_ids"], positions=batch["positions"])["lm"]
    full = np.asarray(jax.nn.log_softmax(logits[0]))
    want = full[2, 6] + full[3, 3]  # Positions 2 and 3 predict the completion 6, [SEP].
    got = float(logprobs.sequence_log_probs(token_lp, batch["completion_mask"])[0])
    np.testing.assert_allclose(got, want, rtol=1e-5)


# --- Runs ---------------------------------------------------------------------------------

def read_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


STEPS, KILL_AT = 10, 5


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """The toy GRPO run, uninterrupted (run through the entry points' `run_task`)."""
    tmp_path = tmp_path_factory.mktemp("whole")
    config = toy_setup(tmp_path)
    config.train.update(num_steps=STEPS, checkpoint_every=KILL_AT)
    config_checks.validate(config)
    return config, tmp_path / "run", run_task.run(config, str(tmp_path / "run"))


def test_toy_grpo_run_raises_the_mean_reward(whole_run):
    _, workdir, results = whole_run
    rows = [r for r in read_rows(workdir) if "train/reward" in r]
    first = np.mean([r["train/reward"] for r in rows[:3]])
    last = np.mean([r["train/reward"] for r in rows[-3:]])
    print(f"toy GRPO reward first 3 steps {first:.3f}, last 3 {last:.3f}; eval "
          f"{results['start']['with_passages']['reward']:.3f} -> "
          f"{results['end']['with_passages']['reward']:.3f}")
    # Measured (12 steps): train reward 0.19-0.31 over the first steps -> 1.0 over the
    # last; greedy eval 0.0 -> 1.0.
    assert last >= first + 0.3, (first, last)
    assert results["end"]["with_passages"]["reward"] >= (
        results["start"]["with_passages"]["reward"] + 0.3)
    for key in ("train/kl", "train/clip_fraction", "train/reward_std_in_group",
                "train/completion_tokens", "train/sampling_tokens_per_s",
                "update_tokens_per_s"):
        assert key in rows[0]
    assert abs(rows[0]["train/kl"]) < 1e-6  # Step 0: the policy is the frozen reference.
    # One update per rollout: π_old is the policy itself, the ratio 1, the clip never binds.
    assert all(r["train/clip_fraction"] == 0.0 and r["train/ratio"] == 1.0 for r in rows)
    assert os.path.isfile(workdir / "reward_curve.png")


def kill_then_resume(config, workdir, kill_at):
    """Runs `config` in `workdir`, killed right after the checkpoint of step `kill_at`,
    then again (resuming) to the end; -> the second start's results."""
    def kill(phase, step):
        if phase == "after_save" and step == kill_at:
            raise KeyboardInterrupt("killed")

    post_run.TEST_HOOK = kill
    try:
        with pytest.raises(KeyboardInterrupt):
            post_run.run_grpo(config, workdir)
    finally:
        post_run.TEST_HOOK = None
    return post_run.run_grpo(config, workdir)


def step_rows(workdir):  # The same samples give the same rewards and losses, bitwise.
    return {r["step"]: {k: v for k, v in r.items() if "per_s" not in k and k != "time"}
            for r in read_rows(workdir)}


def test_kill_and_resume_equals_the_uninterrupted_run(whole_run, tmp_path):
    config, whole_dir, whole = whole_run
    resumed_dir = str(tmp_path / "resumed")
    resumed = kill_then_resume(config, resumed_dir, KILL_AT)
    assert len(step_rows(whole_dir)) == STEPS
    assert step_rows(whole_dir) == step_rows(resumed_dir)
    assert whole["end"] == resumed["end"]
    # The train time counts the killed invocation's seconds too, up to its checkpoint.
    assert len(whole["train_time_segments_s"]) == 1
    first, second = resumed["train_time_segments_s"]
    assert first > 0 and second > 0
    assert resumed["train_time_s"] == pytest.approx(first + second)


def test_several_updates_per_rollout_clip_and_resume_bitwise(tmp_path):
    """updates_per_rollout = μ = 2: π_old is the sampling policy, so a rollout's second
    update has ratio != 1 and the clip binds; killed between rollouts, the run resumes to
    the uninterrupted one bitwise."""
    config = toy_setup(tmp_path)
    config.post_train.updates_per_rollout = 2
    config.train.update(num_steps=2, checkpoint_every=1)
    config_checks.validate(config)
    whole = post_run.run_grpo(config, str(tmp_path / "whole"))
    resumed = kill_then_resume(config, str(tmp_path / "resumed"), 1)
    rows = [r for r in read_rows(tmp_path / "whole") if "train/clip_fraction" in r]
    clip = [r["train/clip_fraction"] for r in rows]
    ratio = [r["train/ratio"] for r in rows]
    print(f"μ=2 clip fraction per step {np.round(clip, 3)}, ratio {np.round(ratio, 4)}")
    # Measured: clip fraction 0.17, 0.24 (a rollout's mean over its two updates; the
    # first update's is 0: with μ = 1 it stays 0, see above), mean ratio 0.96, 1.08.
    assert len(clip) == 2 and max(clip) > 0.05
    assert any(abs(r - 1.0) > 1e-3 for r in ratio)
    assert step_rows(tmp_path / "whole") == step_rows(tmp_path / "resumed")
    assert whole["end"] == resumed["end"]


def test_updates_per_rollout_spreads_the_schedule_over_every_update(tmp_path):
    config = toy_setup(tmp_path)
    config.optim.update(schedule="linear", end_lr_factor=0.0)
    config.post_train.updates_per_rollout = 3
    pt = post_run.build(config, post_run.grpo_objective)
    steps = config.train.num_steps
    assert pt.updates_per_step == 3
    # The optimizer takes num_steps * 3 updates: the decay ends there, not at num_steps.
    lr = config.optim.lr
    np.testing.assert_allclose(float(pt.setup.schedule(steps)), lr * (1 - 1 / 3), rtol=1e-6)
    assert float(pt.setup.schedule(3 * steps)) == 0.0
    config.post_train.updates_per_rollout = 1  # Unchanged for one update per rollout.
    assert float(post_run.build(config, post_run.grpo_objective).setup.schedule(steps)) == 0.0


def test_a_restart_with_allow_config_change_is_accepted_through_the_entry_point(
        whole_run, tmp_path):
    """launch.main's --allow_config_change reaches the runner (run_task.run): a changed
    key is refused without it, accepted and recorded in run_history.jsonl with it."""
    import shutil

    from train.resume_check import ConfigChangedError

    config, whole_dir, whole = whole_run
    workdir = str(tmp_path / "run")
    shutil.copytree(whole_dir, workdir)
    changed = config.copy_and_resolve_references()
    changed.post_train.kl_coef = 0.02
    with pytest.raises(ConfigChangedError, match=r"--allow_config_change=post_train\.kl_coef"):
        run_task.run(changed, workdir)
    results = run_task.run(changed, workdir, ("post_train.kl_coef",))
    assert results["step"] == STEPS and results["end"] == whole["end"]  # Resumed at the end.
    with open(os.path.join(workdir, "run_history.jsonl")) as f:
        history = [json.loads(line) for line in f]
    assert history[-1]["changes"] == {"post_train.kl_coef": [0.01, 0.02]}


# --- The start --------------------------------------------------------------------------

def flat_arrays(tree):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_the_start_loads_the_sft_run_and_draws_only_the_fresh_adapter(tmp_path):
    """init_from = an SFT LoRA run: every base weight is the checkpoint's (its LoRA merged
    into the targeted kernels), the new adapter is what a full init draws, and the state
    equals the old way (a full random init, then loading) bitwise."""
    from train import checkpoints as ckpt
    from train import model_setup, run_record

    sft_dir = tmp_path / "sft"
    sft = toy_setup(tmp_path, method="lora")
    sft_pt = post_run.build(sft, post_run.grpo_objective)
    sft_state = model_setup.init_train_state(sft_pt.model, sft_pt.setup.tx, 32, 11,
                                             sft_pt.shardings)
    sft_state = sft_state.replace(params=jax.tree_util.tree_map_with_path(  # A trained B.
        lambda p, x: x + 0.05 * (1 + jnp.arange(x.size).reshape(x.shape) % 7)
        if "lora_b" in jax.tree_util.keystr(p) else x, sft_state.params))
    os.makedirs(sft_dir)
    run_record.write_run_record(str(sft_dir), sft)
    checkpoints = ckpt.Checkpoints(str(sft_dir), sft.train)
    checkpoints.save(3, sft_state, {"step": 3}, force=True)
    checkpoints.wait()
    checkpoints.close()

    config = toy_setup(tmp_path, method="lora")
    config.init_from, config.seed = str(sft_dir), 5
    pt = post_run.build(config, post_run.grpo_objective)
    state, report = pt.start_state()
    assert report["merged_lora"] and report["checkpoint"].endswith("3")
    assert sorted(report["initialised"]) == sorted(
        p for p in report["initialised"] if "/lora_" in p) and report["initialised"]

    got, saved = flat_arrays(state.params), flat_arrays(sft_state.params)
    scale = sft.model.lora_alpha / sft.model.lora_rank
    for path, value in got.items():
        if "lora_" in path:
            continue
        module = path.removesuffix("['kernel']")
        if path.endswith("['kernel']") and f"{module}['lora_a']" in saved:  # Targeted.
            a, b = saved[f"{module}['lora_a']"], saved[f"{module}['lora_b']"]
            want = saved[path] + scale * np.tensordot(a, b, axes=1)  # numpy, float32.
            np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6, err_msg=path)
            assert not np.array_equal(value, saved[path]), path  # The merge moved it.
        else:
            np.testing.assert_array_equal(value, saved[path], err_msg=path)  # Bitwise.

    # The old way: every parameter drawn at random, then the checkpoint loaded over it.
    full = model_setup.init_train_state(pt.model, pt.setup.tx, 32, config.seed,
                                        pt.shardings)
    old_params, _ = post_run.start_params(config.init_from, full.params)
    old = full.replace(params=old_params, opt_state=jax.jit(pt.setup.tx.init)(old_params))
    for name, tree, want_tree in (("params", state.params, old.params),
                                  ("opt_state", state.opt_state, old.opt_state)):
        want = flat_arrays(want_tree)
        assert flat_arrays(tree).keys() == want.keys()
        for path, value in flat_arrays(tree).items():
            np.testing.assert_array_equal(value, want[path], err_msg=f"{name}{path}")
    adapter = {p: v for p, v in got.items() if "lora_" in p}
    assert any(np.abs(v).sum() > 0 for p, v in adapter.items() if "lora_a" in p)
    assert all(np.all(v == 0) for p, v in adapter.items() if "lora_b" in p)  # Identity.


# --- Ahead of time (--dry_run, --compile_only) --------------------------------------------

@pytest.mark.parametrize("task, method", [("grpo", "full"), ("dpo", "lora")])
def test_dry_run_and_compile_only_report_the_update_step(tmp_path, task, method):
    """launch.main --dry_run / --compile_only (loop.dry_run, aot.compile_only) of a GRPO or
    DPO config report the runner's update step: its rows, the reference policy, and the
    compiled update's arguments (state, a frozen reference copy with full fine-tuning,
    the update batch), not the prefix-LM train step's."""
    from train import aot, loop

    config = toy_setup(tmp_path, task=task, method=method)
    config.data.batch_size = 4  # DPO: 4 pairs, 8 rows.
    config_checks.validate(config)
    counts = loop.dry_run(config, str(tmp_path))
    rows = 16 if task == "grpo" else 8
    frozen_copy = method == "full"
    assert counts["update_step"] == task and counts["update_rows"] == rows
    assert counts["reference"] == ("frozen_copy" if frozen_copy else "adapter_off")
    report = aot.compile_only(config, str(tmp_path))
    assert json.load(open(tmp_path / "compile.json")) == report
    assert report["batch_size"] == rows and report["update_step"] == task
    assert report["trainable"] == counts["trainable"]
    assert (report["trainable"] < report["parameters"]) == (method == "lora")
    param_bytes = report["param_bytes"]
    assert counts["reference_param_bytes"] == (param_bytes if frozen_copy else 0)
    # Per device (8 CPU devices, data parallel): the state and the reference replicated,
    # the batch's rows split; GRPO's fields + advantages, DPO's without.
    seq, devices = 32, report["num_devices"]
    batch_bytes = rows * seq * 4 * 5 + (rows * 4 if task == "grpo" else 0)
    want = report["state_bytes"] + counts["reference_param_bytes"] + batch_bytes // devices
    print(f"{task}/{method}: per-device arguments {report['per_device']['argument_bytes']}"
          f" (state {report['state_bytes']}, reference {counts['reference_param_bytes']},"
          f" batch {batch_bytes // devices})")
    assert report["per_device"]["argument_bytes"] == want


# --- Bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("reward", "exact", "config.post_train.reward='exact'"),
    ("group_size", 1, "config.post_train.group_size=1"),
    ("kl_coef", -0.1, "config.post_train.kl_coef=-0.1"),
    ("updates_per_rollout", 0, "config.post_train.updates_per_rollout=0"),
])
def test_bad_config_is_refused_at_start_up(tmp_path, field, value, message):
    config = toy_setup(tmp_path)
    config.post_train[field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        config_checks.validate(config)


def test_a_restart_under_another_config_is_refused_before_anything_loads(tmp_path):
    from train import run_record
    from train.post_training import run as post_run
    from train.resume_check import ConfigChangedError

    config = toy_setup(tmp_path)
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    run_record.write_run_record(workdir, config)  # What a first start records.
    config.post_train.kl_coef = 0.5
    config.data.qa_dir = str(tmp_path / "missing")  # Loading would fail differently.
    with pytest.raises(ConfigChangedError,
                       match=r"config.post_train.kl_coef: 0.01 \(recorded\) -> 0.5"):
        post_run.run(config, workdir, "grpo")


def test_rewards_score_like_the_rag_evaluation():
    from retrieval import rag as rag_eval

    for answer, gold in [("A dog.", "dog"), ("the Dog", "dog"), ("dogs", "dog"),
                         ("a hunting dog", "dog"), ("", "dog")]:
        assert rewards.exact_match(answer, [gold]) == rag_eval.exact_match(answer, [gold])
        assert rewards.gold_contained(answer, [gold]) == rag_eval.gold_contained(answer,
                                                                                 [gold])
    assert rewards.reward("exact_match", "dog", ["dog"], True, 0.1) == pytest.approx(1.1)
    assert rewards.reward("exact_match", "dog\nand more", ["dog"], False, 0.1) == 0.0
