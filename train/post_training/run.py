"""The post-training runner (tasks "grpo" and "dpo"): the policy starts from a fine-tuned
run (its LoRA merged into the base weights, a fresh adapter on top) or a pre-trained
checkpoint, the reference is that start with the adapter off, and one compiled update
step trains it; the loop saves, resumes and logs like train/loop.py.

  GRPO step s: prompts s*P .. s*P+P-1 of the seeded example order, G completions each
    sampled with the key from (seed, s) (so a resumed run draws the same samples),
    rewards, group advantages, then post_train.updates_per_rollout (μ) updates on the
    clipped objective + β·KL against the policy that sampled them (π_old). A step is one
    rollout: checkpoints fall between rollouts, the optimizer takes num_steps·μ updates.
  DPO step s: pairs s*B .. of the seeded order (pairs.jsonl: a given file, or built once
    from the start policy's samples: the gold answer over a wrong sampled one).

Evaluation (the start and the end; `config.train.eval_every` in between): greedy answers
to `post_train.eval_questions` held-out questions, closed-book and with the examples'
passages: exact match, gold contained, reward, answer tokens, and the KL to the reference
(mean over answers of Σ log π - log π_ref over the answer's tokens).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from model.lora import merge_lora
from train import checkpoints as ckpt
from train import model_setup, partitioning, run_record
from train import trainer as trainer_lib
from train.data import pipeline
from train.data import tokenizer as tokenizers
from train.embedding import unflatten
from train.init_from import init_params_from, load_params, merge_params
from train.loop import TrainClock
from train.metrics_log import MetricsLog
from train.param_rules import combine, partition, path_string
from train.post_training import dpo, grpo, logprobs, rewards, rollout
from train.resume_check import check_resume
from train.run_files import atomic_write_json, write_results
from train.tasks import prefix_lm_examples

log = logging.getLogger("strata")

ROLLOUT_STREAM, PAIRS_STREAM = 1, 2  # fold_in tags: rollouts and DPO pair sampling.


def check(config):
    """Start-up checks of config.post_train, each naming its key."""
    pc = config.post_train
    rewards.check_reward(pc.reward, pc.format_reward)
    if pc.group_size < 2:
        raise ValueError(f"config.post_train.group_size={pc.group_size}; GRPO normalises "
                         f"rewards within a group of completions per prompt: expected >= 2")
    if pc.kl_coef < 0:
        raise ValueError(f"config.post_train.kl_coef={pc.kl_coef}; expected >= 0 (the KL "
                         f"penalty's weight; 0 = no penalty)")
    if not 0 < pc.clip_eps < 1:
        raise ValueError(f"config.post_train.clip_eps={pc.clip_eps}; expected in (0, 1)")
    if pc.dpo_beta <= 0:
        raise ValueError(f"config.post_train.dpo_beta={pc.dpo_beta}; expected > 0")
    if pc.prompts_per_step < 1 or pc.max_new_tokens < 1:
        raise ValueError(f"config.post_train.prompts_per_step={pc.prompts_per_step} / "
                         f"max_new_tokens={pc.max_new_tokens}; expected >= 1")
    if pc.updates_per_rollout < 1:
        raise ValueError(f"config.post_train.updates_per_rollout={pc.updates_per_rollout}; "
                         f"expected >= 1 (GRPO's μ: policy updates per rollout)")
    if pc.temperature <= 0 or not 0 < pc.top_p <= 1:
        raise ValueError(f"config.post_train.temperature={pc.temperature} / top_p="
                         f"{pc.top_p}; expected temperature > 0 and 0 < top_p <= 1")


# --- The start and the reference ----------------------------------------------------------

def start_params(init_from, fresh):
    """The policy's starting params: `fresh` (a new adapter at its identity init) with
    every base weight loaded from `init_from`. A fine-tuned workdir's LoRA is merged into
    its kernels first (its config.json gives alpha and rank), so the adapter trained here
    starts at zero on top of the SFT model, which is then the reference."""
    if init_from.startswith(("gguf:", "hf:")) or not os.path.isfile(
            os.path.join(init_from, "config.json")):
        return init_params_from(init_from, fresh)
    flat, step_dir = load_params(init_from)
    if any(k.endswith("/lora_a") for k in flat):
        with open(os.path.join(init_from, "config.json")) as f:
            model_cfg = json.load(f)["model"]
        merged = merge_lora(unflatten(flat), types.SimpleNamespace(**model_cfg))
        flat = {path_string(p): np.asarray(v)
                for p, v in jax.tree_util.tree_flatten_with_path(merged)[0]}
    params, report = merge_params(fresh, flat)  # `fresh` may be abstract: left as is.
    if report["shape_mismatch"] or not report["loaded"]:
        raise ValueError(f"config.init_from={init_from!r} ({step_dir}) does not fit "
                         f"config.model: shape mismatches {report['shape_mismatch']}, "
                         f"{len(report['loaded'])} parameters loaded")
    return params, {"checkpoint": step_dir, "merged_lora": True, **report}


# --- The compiled update step -------------------------------------------------------------

def grpo_objective(model, ref_model, post_cfg):
    """π_old is the policy that sampled the rollout. Its first update is made by that
    policy itself (π_old = π under stop-gradient: ρ = 1 exactly); with μ > 1 that update
    also returns those log-probs (metrics["sampling_log_probs"], computed once per
    rollout) and the later ones read them from batch["old_log_probs"]: ρ != 1, the clip
    can bind."""
    several = int(post_cfg.updates_per_rollout) > 1

    def objective(params, ref_params, batch):
        token_lp = logprobs.token_log_probs(model, params, batch)
        ref_lp = logprobs.reference_token_log_probs(ref_model, ref_params, params, batch)
        first = "old_log_probs" not in batch
        old_lp = jax.lax.stop_gradient(token_lp) if first else batch["old_log_probs"]
        loss, metrics = grpo.grpo_loss(
            token_lp, old_lp, ref_lp, batch["advantages"], batch["completion_mask"],
            clip_eps=float(post_cfg.clip_eps), kl_coef=float(post_cfg.kl_coef))
        if several and first:
            metrics["sampling_log_probs"] = old_lp
        return loss, metrics
    return objective


def dpo_objective(model, ref_model, post_cfg):
    """Rows alternate chosen, rejected (pairs stay on one device)."""
    def objective(params, ref_params, batch):
        mask = batch["completion_mask"]
        policy = logprobs.sequence_log_probs(
            logprobs.token_log_probs(model, params, batch), mask).reshape(-1, 2)
        ref = logprobs.sequence_log_probs(logprobs.reference_token_log_probs(
            ref_model, ref_params, params, batch), mask).reshape(-1, 2)
        return dpo.dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1],
                            float(post_cfg.dpo_beta))
    return objective


def make_update_step(objective, tx, trainable, schedule=None):
    """(state, ref_params, batch) -> (state, metrics): a gradient step on `objective`
    w.r.t. the trainable leaves only; frozen ones carried over bitwise (as train/steps.py)."""
    def step(state, ref_params, batch):
        def loss_fn(train_params, frozen):
            params = train_params if frozen is None else combine(train_params, frozen)
            return objective(params, ref_params, batch)

        if trainable is None:
            differentiated, frozen = state.params, None
        else:
            differentiated, frozen = partition(state.params, trainable)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            differentiated, frozen)
        if frozen is not None:
            grads = combine(grads, jax.tree.map(jnp.zeros_like, frozen))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if frozen is not None:
            params = combine(partition(params, trainable)[0], frozen)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                   "nonfinite": 1.0 - jnp.isfinite(loss).astype(jnp.float32)}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
    return step


@dataclasses.dataclass
class PostTrainer:
    """The model, its reference, the compiled steps and the data, on one mesh."""

    config: object
    model: object
    ref_model: object
    mesh: object
    rules: tuple
    update: object
    score: object
    shardings: object
    batch_sharding: object
    abstract: object
    setup: object
    updates_per_step: int  # GRPO's μ (post_train.updates_per_rollout); DPO: 1.

    @functools.cached_property
    def tokenizer(self):  # Loaded on first use: --compile_only needs none.
        return tokenizers.get_tokenizer(self.config.data)

    def start_state(self):
        """-> (the run's fresh state, config.init_from's report or {}): the start
        parameters (`start_params`) loaded over an init that draws only those the
        checkpoint lacks (the fresh adapter), as the loop's `Trainer.init_state_from`."""
        config = self.config
        if not config.init_from:
            return model_setup.init_train_state(self.model, self.setup.tx,
                                                config.data.seq_len, config.seed,
                                                self.shardings), {}
        return trainer_lib.init_state_from(self.setup, self.shardings, config.data.seq_len,
                                           config.init_from, config.seed, load=start_params)

    @property
    def stop(self):
        return rollout.stop_id(self.tokenizer, self.config.data.prompt_format)


def update_rows(config, objective_of):
    """Rows of the update batch: GRPO prompts_per_step * G; DPO 2 * data.batch_size."""
    if objective_of is grpo_objective:
        return int(config.post_train.prompts_per_step * config.post_train.group_size)
    return 2 * int(config.data.batch_size)


def update_setup(config, updates_per_step):
    """trainer_lib.abstract_setup with the learning-rate schedule spread over every
    update: train.num_steps rollouts of `updates_per_step` updates each."""
    if updates_per_step > 1:
        config = config.copy_and_resolve_references()
        config.train.num_steps = int(config.train.num_steps) * updates_per_step
    return trainer_lib.abstract_setup(config)


def build(config, objective_of, devices=None):
    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    mesh = partitioning.make_mesh(config.mesh, devices)
    rows = update_rows(config, objective_of)
    partitioning.check_batch_divides(rows, mesh, "the update batch's rows (GRPO: "
                                     "post_train.prompts_per_step * group_size; DPO: 2 * "
                                     "data.batch_size)")
    updates_per_step = (int(config.post_train.updates_per_rollout)
                        if objective_of is grpo_objective else 1)
    setup = update_setup(config, updates_per_step)
    model = setup.model
    ref_model = logprobs.reference_model(model) or model
    shardings = model_setup.state_shardings(setup.boxed, mesh, rules)
    ref_shardings = None if ref_model is not model else shardings.params
    batch_sharding = partitioning.batch_sharding(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        update = jax.jit(
            make_update_step(objective_of(model, ref_model, config.post_train), setup.tx,
                             setup.trainable, setup.schedule),
            in_shardings=(shardings, ref_shardings, batch_sharding),
            out_shardings=(shardings, partitioning.replicated(mesh)), donate_argnums=(0,))

        def score(params, ref_params, batch):
            token_lp = logprobs.token_log_probs(model, params, batch)
            ref_lp = logprobs.reference_token_log_probs(ref_model, ref_params, params, batch)
            return token_lp, ref_lp
        score = jax.jit(score)
    return PostTrainer(config, model, ref_model, mesh, rules, update, score, shardings,
                       batch_sharding, ckpt.abstract_with_shardings(setup.abstract, shardings),
                       setup, updates_per_step)


OBJECTIVES = {"grpo": grpo_objective, "dpo": dpo_objective}  # config.task -> objective.


# --- Ahead of time (--dry_run, --compile_only) --------------------------------------------

def describe_update_step(config, setup):
    """The update step's facts for --dry_run (nothing built, nothing allocated): its
    rows, the reference policy (the adapter switched off, or a frozen copy of the
    parameters and the bytes it adds), GRPO's updates per rollout."""
    objective_of = OBJECTIVES[config.task]
    adapter_off = logprobs.reference_model(setup.model) is not None
    params = jax.tree.leaves(setup.abstract.params)
    facts = {"update_step": config.task, "update_rows": update_rows(config, objective_of),
             "reference": "adapter_off" if adapter_off else "frozen_copy",
             "reference_param_bytes": 0 if adapter_off else int(sum(
                 np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in params))}
    if objective_of is grpo_objective:
        facts["updates_per_rollout"] = int(config.post_train.updates_per_rollout)
    return facts


def abstract_update_step(config, devices=None):
    """The compiled update step of config.task ("grpo" | "dpo") with abstract state,
    reference and batch (rollout.update_batch's fields; GRPO's advantages) over
    `devices`, for train/aot.py: the step a run trains with, not the prefix-LM one."""
    from train.aot import StepToCompile

    objective_of = OBJECTIVES[config.task]
    pt = build(config, objective_of, devices)
    rows = update_rows(config, objective_of)
    example = rollout.update_batch([[0]] * rows, [[0]] * rows, int(config.data.seq_len), 0)
    if objective_of is grpo_objective:
        example["advantages"] = np.zeros((rows,), np.float32)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=pt.batch_sharding)
             for k, v in example.items()}
    ref_params = None if pt.ref_model is not pt.model else pt.abstract.params
    return StepToCompile(pt.update, (pt.abstract, ref_params, batch), pt.mesh, pt.rules,
                         pt.setup, rows, describe_update_step(config, pt.setup))


# --- Evaluation ---------------------------------------------------------------------------

def evaluate(pt, params, ref_params, examples, closed_book):
    """Greedy answers to `examples` -> {exact_match, gold_contained, reward, format,
    answer_tokens, kl, count, per_question: {exact_match, gold_contained}} (per-question
    0/1 scores: a paired test of start vs end over the same questions)."""
    cfg, pc = pt.config, pt.config.post_train
    batch_size = int(cfg.data.eval_batch_size)
    greedy = rollout.decode_config(pc, pt.tokenizer, cfg.data.prompt_format, greedy=True)
    sums = dict(reward=0.0, format=0.0, answer_tokens=0.0, kl=0.0)
    scorers = {"exact_match": rewards.exact_match, "gold_contained": rewards.gold_contained}
    per_question = {metric: [] for metric in scorers}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [rollout.prompt_ids(pt.tokenizer, ex, cfg.data, pc.max_new_tokens,
                                      closed_book) for ex in chunk]
        padded = prompts + [prompts[0]] * (batch_size - len(prompts))  # One batch shape.
        with jax.set_mesh(pt.mesh), nn.logical_axis_rules(pt.rules):
            new = rollout.sample(pt.model, params, padded, greedy, None, pt.model.cfg.max_len)
            answers, finished = rollout.completions(new, pt.stop)
            batch = rollout.update_batch(padded, answers, cfg.data.seq_len,
                                         pt.tokenizer.pad_id)
            token_lp, ref_lp = pt.score(params, ref_params, batch)
        seq_kl = np.sum((np.asarray(token_lp) - np.asarray(ref_lp))
                        * batch["completion_mask"], axis=-1)
        for i, ex in enumerate(chunk):
            text = rollout.answer_text(pt.tokenizer, answers[i], pt.stop)
            golds = [ex["answer"]]
            for metric, scorer in scorers.items():
                per_question[metric].append(scorer(text, golds))
            sums["format"] += rewards.format_score(text, finished[i])
            sums["reward"] += rewards.reward(pc.reward, text, golds, finished[i],
                                             pc.format_reward)
            sums["answer_tokens"] += len(answers[i])
            sums["kl"] += float(seq_kl[i])
    means = {k: v / len(examples) for k, v in sums.items()}
    return (means | {m: sum(scores) / len(examples) for m, scores in per_question.items()}
            | {"count": len(examples), "per_question": per_question})


def evaluate_modes(pt, params, ref_params, examples):
    return {"closed_book": evaluate(pt, params, ref_params, examples, True),
            "with_passages": evaluate(pt, params, ref_params, examples, False)}


# --- Step data ----------------------------------------------------------------------------

def grpo_batch(pt, params, examples, step):
    """Rollout of step `step` -> (update batch, metrics, timings)."""
    cfg, pc = pt.config, pt.config.post_train
    group, count = int(pc.group_size), int(pc.prompts_per_step)
    chosen = [examples[i] for i in rollout.example_order(len(examples), count, cfg.seed,
                                                         step * count)]
    prompts = [rollout.prompt_ids(pt.tokenizer, ex, cfg.data, pc.max_new_tokens)
               for ex in chosen]
    rows = [p for p in prompts for _ in range(group)]
    config = rollout.decode_config(pc, pt.tokenizer, cfg.data.prompt_format)
    start = time.perf_counter()
    with jax.set_mesh(pt.mesh), nn.logical_axis_rules(pt.rules):
        new = rollout.sample(pt.model, params, rows, config,
                             rollout.rollout_key(cfg.seed, step, ROLLOUT_STREAM),
                             pt.model.cfg.max_len)
    sampling_s = time.perf_counter() - start
    answers, finished = rollout.completions(new, pt.stop)
    texts = [rollout.answer_text(pt.tokenizer, a, pt.stop) for a in answers]
    golds = [[ex["answer"]] for ex in chosen for _ in range(group)]
    reward = np.array([rewards.reward(pc.reward, t, g, f, pc.format_reward)
                       for t, g, f in zip(texts, golds, finished)]).reshape(count, group)
    correct = [rewards.CORRECTNESS[pc.reward](t, g) for t, g in zip(texts, golds)]
    batch = rollout.update_batch(rows, answers, cfg.data.seq_len, pt.tokenizer.pad_id)
    batch["advantages"] = grpo.group_advantages(reward).reshape(-1)
    generated = sum(len(a) for a in answers)
    metrics = {"reward": float(reward.mean()),
               "reward_std_in_group": float(reward.std(axis=1, ddof=1).mean()),
               "correct": float(np.mean(correct)), "completion_tokens": generated / len(rows),
               "sampling_tokens_per_s": generated / sampling_s}
    return batch, metrics


def read_pairs(path):
    """pairs.jsonl -> list of {question, passages, chosen, rejected}; identical chosen
    and rejected text is an error naming the file and line."""
    with open(path) as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    if not pairs:
        raise ValueError(f"{path} holds no preference pairs")
    for i, pair in enumerate(pairs, start=1):
        for key in ("question", "chosen", "rejected"):
            if key not in pair:
                raise ValueError(f"{path} line {i}: no {key!r} (a pair needs question, "
                                 f"chosen, rejected; passages optional)")
        if pair["chosen"].strip() == pair["rejected"].strip():
            raise ValueError(f"{path} line {i}: 'chosen' and 'rejected' are the same text "
                             f"({pair['chosen']!r}); a pair must prefer one answer over "
                             f"another")
    return pairs


def build_pairs(pt, params, examples, path):
    """Pairs from the start policy's samples: for each of the first post_train.max_pairs
    examples, the gold answer (chosen) over its first sampled answer that is wrong
    (rejected); examples whose G samples are all right give no pair. Written once."""
    cfg, pc = pt.config, pt.config.post_train
    group, out = int(pc.group_size), []
    config = rollout.decode_config(pc, pt.tokenizer, cfg.data.prompt_format)
    chosen = examples[:int(pc.max_pairs)]
    chunk = max(1, int(cfg.data.eval_batch_size) // group)
    for start in range(0, len(chosen), chunk):
        part = chosen[start:start + chunk]
        prompts = [rollout.prompt_ids(pt.tokenizer, ex, cfg.data, pc.max_new_tokens)
                   for ex in part]
        rows = [p for p in prompts for _ in range(group)]
        rows += [rows[0]] * (chunk * group - len(rows))
        with jax.set_mesh(pt.mesh), nn.logical_axis_rules(pt.rules):
            new = rollout.sample(pt.model, params, rows, config,
                                 rollout.rollout_key(cfg.seed, start, PAIRS_STREAM),
                                 pt.model.cfg.max_len)
        answers, _ = rollout.completions(new, pt.stop)
        for i, ex in enumerate(part):
            texts = [rollout.answer_text(pt.tokenizer, a, pt.stop).strip()
                     for a in answers[i * group:(i + 1) * group]]
            wrong = [t for t in texts if t and not rewards.exact_match(t, [ex["answer"]])]
            if wrong:
                out.append({"question": ex["question"], "passages": ex.get("passages", []),
                            "chosen": ex["answer"], "rejected": wrong[0]})
    prefix_lm_examples.write_split(os.path.dirname(path), "pairs", out)
    return path


def dpo_batch(pt, pairs, step):
    cfg, pc = pt.config, pt.config.post_train
    count = int(cfg.data.batch_size)
    chosen = [pairs[i] for i in rollout.example_order(len(pairs), count, cfg.seed,
                                                      step * count)]
    prompts, answers = [], []
    for pair in chosen:
        prompt = rollout.prompt_ids(pt.tokenizer, pair, cfg.data, pc.max_new_tokens)
        for key in ("chosen", "rejected"):
            ids = pt.tokenizer.encode(pair[key])[:int(pc.max_new_tokens) - 1] + [pt.stop]
            prompts.append(prompt)
            answers.append(ids)
    batch = rollout.update_batch(prompts, answers, cfg.data.seq_len, pt.tokenizer.pad_id)
    return batch, {"completion_tokens": float(np.mean([len(a) for a in answers]))}


def update_on_rollout(pt, state, ref_params, local):
    """`pt.updates_per_step` updates on one rollout's batch -> (state, metrics: each the
    mean over the updates; "nonfinite" if any update's loss was). The first update's
    log-probs (the sampling policy's) are every later update's π_old."""
    batch = pipeline.to_global_batch(local, pt.mesh)
    updates = []
    for _ in range(pt.updates_per_step):
        with jax.set_mesh(pt.mesh), nn.logical_axis_rules(pt.rules):
            state, metrics = pt.update(state, ref_params, batch)
        sampling_lp = metrics.pop("sampling_log_probs", None)
        if sampling_lp is not None:
            batch = {**batch, "old_log_probs": jax.device_put(sampling_lp, pt.batch_sharding)}
        updates.append(jax.device_get(metrics))
    if len(updates) == 1:
        return state, updates[0]
    return state, {k: np.max([u[k] for u in updates]) if k == "nonfinite"
                   else np.mean([u[k] for u in updates]) for k in updates[0]}


# --- The run ------------------------------------------------------------------------------

def write_reward_curve(workdir):
    """reward_curve.png beside metrics.jsonl: train reward (GRPO) or DPO's reward
    accuracy against step, and the evaluated exact match."""
    from train.metrics_log import read_metrics

    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6))
    for key, style in (("train/reward", "-"), ("train/reward_accuracy", "-"),
                       ("eval/with_passages/reward", "o-"), ("eval/closed_book/reward", "s-")):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), float)]
        if points:
            axis.plot(*zip(*points), style, label=key, markersize=4)
    axis.set_xlabel("step")
    axis.set_ylabel("reward")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    out = os.path.join(workdir, "reward_curve.png")
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def _flat_eval(results):
    return {f"eval/{mode}/{k}": v for mode, r in results.items() for k, v in r.items()
            if k not in ("count", "per_question")}


def run_grpo(config, workdir, allow_config_change=()):
    """Task "grpo": see the module docstring."""
    return run(config, workdir, "grpo", allow_config_change)


def run_dpo(config, workdir, allow_config_change=()):
    """Task "dpo": see the module docstring."""
    return run(config, workdir, "dpo", allow_config_change)


def run(config, workdir, algo, allow_config_change=()):
    """Trains `algo` ("grpo" | "dpo") in `workdir`, resuming from its latest checkpoint;
    writes results.json (the start's and the end's evaluation). `allow_config_change`:
    fields a restart may change beyond the safe ones (train/resume_check.py)."""
    check(config)
    # A restart under another config would continue these checkpoints (and rollouts)
    # under a different computation: refused before anything loads, as the loop does.
    changes = check_resume(run_record.read_recorded_config(workdir), config.to_dict(),
                           workdir, allow_config_change)
    for field, (old, new) in changes.items():
        log.warning("Restart with config.%s changed: %r -> %r", field, old, new)
    os.makedirs(workdir, exist_ok=True)
    train_examples = prefix_lm_examples.load_split(config.data, config.data.train_split)
    eval_examples = prefix_lm_examples.load_split(config.data, config.data.test_split)
    eval_examples = eval_examples[:int(config.post_train.eval_questions)]
    pt = build(config, OBJECTIVES[algo])
    run_record.write_run_record(workdir, config)
    run_record.append_run_history(workdir, config, changes)

    # The start (fresh or resumed) and the reference.
    initial, report = pt.start_state()
    params = initial.params
    ref_params = None if pt.ref_model is not pt.model else jax.tree.map(jnp.copy, params)
    checkpoints = ckpt.Checkpoints(workdir, config.train)
    restored = checkpoints.restore_latest_intact(pt.abstract)
    if restored is not None:
        step, state, _ = restored
        log.info("Resumed %s from step %d in %s", algo, step, workdir)
    else:
        step, state = 0, initial
        if report:
            atomic_write_json(os.path.join(workdir, "init_from.json"),
                              {k: v if not isinstance(v, list) else len(v)
                               for k, v in report.items()})
    del initial

    results_path = os.path.join(workdir, "start_eval.json")
    if not os.path.exists(results_path):  # The start's evaluation: the reference's.
        atomic_write_json(results_path, evaluate_modes(pt, params, ref_params, eval_examples))
    start_eval = json.load(open(results_path))
    pairs = None
    if algo == "dpo":
        path = config.post_train.pairs_file or os.path.join(workdir, "pairs", "pairs.jsonl")
        if not config.post_train.pairs_file and not os.path.exists(path):
            build_pairs(pt, params, train_examples, path)
        pairs = read_pairs(path)
    del params

    num_steps, train_cfg = config.train.num_steps, config.train
    metrics_log = MetricsLog(workdir, num_steps, step, train_cfg.progress)
    clock = TrainClock(workdir, step)  # Seconds over every invocation (restarts too).
    try:
        while step < num_steps:
            if algo == "grpo":
                local, extra = grpo_batch(pt, state.params, train_examples, step)
            else:
                local, extra = dpo_batch(pt, pairs, step)
            start = time.perf_counter()
            state, metrics = update_on_rollout(pt, state, ref_params, local)
            update_s = time.perf_counter() - start
            step += 1
            if metrics.pop("nonfinite"):
                raise FloatingPointError(f"Non-finite {algo} loss at step {step}; the last "
                                         f"good checkpoint is {checkpoints.latest_step()}")
            record = {f"train/{k}": float(v) for k, v in {**metrics, **extra}.items()}
            record["update_tokens_per_s"] = (float(local["segment_ids"].sum())
                                             * pt.updates_per_step / update_s)
            if step % train_cfg.eval_every == 0 and step < num_steps:
                record.update(_flat_eval(evaluate_modes(pt, state.params, ref_params,
                                                        eval_examples)))
            if step % train_cfg.log_every == 0 or step == num_steps:
                metrics_log.write(step, record)
                metrics_log.progress(step, {"loss": f"{record['train/loss']:.4f}"})
            if step % train_cfg.checkpoint_every == 0 or step == num_steps:
                checkpoints.save(step, state, {"step": step}, force=True)
                clock.saved(step)
                _test_hook("after_save", step)
        final = evaluate_modes(pt, state.params, ref_params, eval_examples)
        metrics_log.write(step, _flat_eval(final))
    finally:
        checkpoints.wait()
        checkpoints.close()
        metrics_log.close()
    write_reward_curve(workdir)
    return write_results(workdir, {
        "algo": algo, "step": step, **clock.report(),
        "parameters": pt.setup.counts, "start": start_eval, "end": final,
        "pairs": None if pairs is None else len(pairs)})


TEST_HOOK = None  # Tests stop a run at an exact point through this (phase, step).


def _test_hook(phase, step):
    if TEST_HOOK is not None:
        TEST_HOOK(phase, step)
