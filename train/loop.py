"""The one train loop every stage runs: config -> data -> compiled steps -> checkpoints.

Read it top to bottom (big_vision style). Side effects (I/O, logging, checkpoints) live
here; the steps, losses and model are pure.
"""

import json
import logging
import os
import signal
import time

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from train import checkpoints as ckpt
from train import flops, memory, model_setup, objectives, partitioning
from train.data import augmentation, masking, pairs, pipeline, prefix_lm, sources, tokenizer, unilm
from train.forgetting import measure_forgetting
from train.init_from import init_params_from
from train.learning_curves import write_learning_curves
from train.metrics_log import MetricsLog
from train.optimizer import optimizer_state_bytes
from train.run_record import write_run_record
from train.steps import make_eval_step, make_train_step
from train.unfreezing import unfreeze_steps

log = logging.getLogger("strata")


class NonFiniteLossError(FloatingPointError):
    pass


def dry_run(config, workdir):
    """Build model and optimizer abstractly; write `params.json`; allocate nothing."""
    model = model_setup.build_model(config)
    tx, _, trainable = model_setup.build_optimizer(config, model)
    _, abstract = model_setup.abstract_train_state(model, tx, config.data.seq_len)
    counts = model_setup.parameter_counts(abstract.params, trainable)
    counts["optimizer_state_bytes"] = optimizer_state_bytes(abstract.opt_state)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "params.json"), "w") as f:
        json.dump(counts, f, indent=2)
    return counts


def training_data_report(data_cfg, train_source):
    """What the run trained on, for results.json: the labelled examples actually used."""
    return {"label_fraction": float(data_cfg.label_fraction),
            "train_examples": len(train_source),
            "sampling": data_cfg.sampling,
            "token_dropout": float(data_cfg.token_dropout),
            "token_substitution": float(data_cfg.token_substitution)}


def train_and_evaluate(config, workdir):
    """Trains `config` in `workdir` (resuming from its latest checkpoint); returns results."""
    # --- Record the run -----------------------------------------------------------
    write_run_record(workdir, config)
    rules = tuple(tuple(r) for r in config.logical_axis_rules)

    # --- Set up the mesh ------------------------------------------------------------
    mesh = partitioning.make_mesh(config.mesh)
    partitioning.check_batch_divides(config.data.batch_size, mesh)
    # Each micro-batch of gradient accumulation is itself split over the mesh.
    partitioning.check_batch_divides(
        config.data.batch_size // config.optim.grad_accum_steps, mesh,
        "config.data.batch_size / config.optim.grad_accum_steps")
    partitioning.check_batch_divides(config.data.eval_batch_size, mesh,
                                     "config.data.eval_batch_size")
    batch_sharding = partitioning.batch_sharding(mesh)
    log.info("Mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size,
             jax.devices()[0].device_kind)

    # --- Data -----------------------------------------------------------------------
    data_cfg = config.data
    # prefix_lm: (question + passages, answer) examples a runner wrote to data.qa_dir;
    # retriever: (question, passage) pairs there (train/data/pairs.py).
    generative = config.task == "prefix_lm"
    paired = config.task == "retriever"
    if jax.process_count() > 1 and not paired:
        # Process 0 builds the dataset and tokenizer once; the others then only read.
        if jax.process_index() == 0:
            sources.load_split(data_cfg, data_cfg.train_split)
            tokenizer.get_tokenizer(data_cfg)
        multihost_utils.sync_global_devices("strata: data prepared")
    load_split = (prefix_lm.load_split if generative else pairs.load_split if paired
                  else sources.load_split)
    train_source = load_split(data_cfg, data_cfg.train_split)
    tok = tokenizer.get_tokenizer(data_cfg)
    if tok.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"The tokenizer has {tok.vocab_size} pieces but config.model.vocab_size="
            f"{config.model.vocab_size}; set it to at least the tokenizer's size")
    mlm = config.task == "mlm"  # Self-supervised: labels unused, tokens masked BERT-style.
    # UniLM: a fraction of the MLM rows are prefix-LM rows (train/data/unilm.py).
    mixing = mlm and unilm.prefix_lm_fraction(data_cfg) > 0
    mlm_fields = unilm if mixing else masking
    if generative or paired:
        train_iter = (prefix_lm if generative else pairs).make_train_iterator(
            train_source, tok, data_cfg, seed=config.seed)
    else:
        train_iter = pipeline.make_train_iterator(
            train_source, tok, data_cfg, seed=config.seed,
            with_labels=False if mlm else None,
            transform=pipeline.chain_transforms(  # Augment the text first, then mask it.
                augmentation.train_transform(tok, data_cfg, seed=config.seed),
                mlm_fields.train_transform(tok, data_cfg, seed=config.seed) if mlm else None))

    eval_sources = {split: load_split(data_cfg, split)  # Opened once, read per eval.
                    for split in (data_cfg.eval_split, data_cfg.test_split)}

    def eval_batches(split):
        if generative or paired:
            return (prefix_lm if generative else pairs).make_eval_iterator(
                eval_sources[split], tok, data_cfg)
        return pipeline.make_eval_iterator(
            eval_sources[split], tok, data_cfg, with_labels=False if mlm else None,
            transform=mlm_fields.eval_transform(tok, data_cfg) if mlm else None)

    # --- Model, optimizer, objective ------------------------------------------------
    model = model_setup.build_model(config)
    num_steps = config.train.num_steps
    tx, schedule, trainable = model_setup.build_optimizer(config, model)
    class_weights = None
    if config.train.class_weighted_loss:
        labels = [train_source[i]["label"] for i in range(len(train_source))]
        class_weights = objectives.balanced_class_weights(
            np.bincount(labels, minlength=config.model.num_classes))
    objective = objectives.make_objective(config, class_weights)

    # --- Shard and initialise, or resume ------------------------------------------------
    boxed, abstract = model_setup.abstract_train_state(model, tx, data_cfg.seq_len)
    shardings = model_setup.state_shardings(boxed, mesh, rules)
    counts = model_setup.parameter_counts(abstract.params, trainable)
    counts["optimizer_state_bytes"] = optimizer_state_bytes(abstract.opt_state)
    log.info("Parameters: %s total, %s trainable", f"{counts['total']:,}",
             f"{counts['trainable']:,}")
    if config.optim.gradual_unfreeze_every:
        log.info("Gradual unfreezing, first step each module trains: %s", unfreeze_steps(
            abstract.params, config.optim.gradual_unfreeze_every))
    checkpoints = ckpt.Checkpoints(workdir, config.train)
    start_step = checkpoints.latest_step()
    if start_step is not None:
        state, data_state = checkpoints.restore(
            ckpt.abstract_with_shardings(abstract, shardings))
        train_iter.set_state(data_state)
        log.info("Resumed from step %d in %s", start_step, workdir)
    else:
        start_step = 0
        state = model_setup.init_train_state(model, tx, data_cfg.seq_len, config.seed,
                                             shardings)
        if config.init_from:
            params, init_report = init_params_from(config.init_from, state.params)
            # Optimizer state starts fresh on the loaded params: the regulariser's anchor
            # (optim.regularize_toward="init") is what the run starts from, not the init.
            opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
            state = state.replace(params=params, opt_state=opt_state)
            if jax.process_index() == 0:
                with open(os.path.join(workdir, "init_from.json"), "w") as f:
                    json.dump(init_report, f, indent=2)

    # --- Compile the steps ------------------------------------------------------------
    replicated = partitioning.replicated(mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        train_step = jax.jit(
            make_train_step(model, tx, objective, seed=config.seed,
                            grad_accum_steps=config.optim.grad_accum_steps,
                            schedule=schedule, trainable=trainable),
            in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
            donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(model, objective),
                            in_shardings=(shardings.params, batch_sharding),
                            out_shardings=replicated)

    def evaluate(params, split, max_steps):
        totals = None
        for i, local in enumerate(eval_batches(split)):
            if 0 <= max_steps <= i:
                break
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                sums = eval_step(params, pipeline.to_global_batch(local, mesh))
            totals = sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
            totals = jax.tree_util.tree_map(np.asarray, totals)
        return objective.finalize(totals)

    # --- Train ----------------------------------------------------------------------
    vocab_fraction = masking.max_predictions(data_cfg) / data_cfg.seq_len if mlm else 0.0
    if generative or mixing:  # The LM head runs at every position.
        vocab_fraction += 1.0
    flops_per_token = flops.train_flops_per_token(model.cfg, data_cfg.seq_len, vocab_fraction)
    peak = flops.measured_peak_flops() * jax.device_count()
    metrics_log = MetricsLog(workdir, num_steps, start_step, config.train.progress)
    # SIGTERM (preemption) only raises a flag: the loop saves a checkpoint and exits.
    preempted = {"flag": False}
    previous_handler = signal.signal(
        signal.SIGTERM, lambda *_: preempted.__setitem__("flag", True))
    running, running_steps, tokens, real_tokens = None, 0, 0, 0
    compiled_train_step = None
    interval_start = train_start = time.perf_counter()
    step = start_step
    try:
        while step < num_steps:
            local = next(train_iter)
            sides = ("", "passage_") if paired else ("",)  # Pairs: queries and passages.
            tokens += sum(local[f"{s}tokens"].size for s in sides) * jax.process_count()
            real_tokens += sum(int((local[f"{s}segment_ids"] > 0).sum())
                               for s in sides) * jax.process_count()
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                batch = pipeline.to_global_batch(local, mesh)
                if compiled_train_step is None:  # Compiled ahead once: XLA's memory figure.
                    compiled_train_step = train_step.lower(state, batch).compile()
                state, metrics = compiled_train_step(state, batch)
            step += 1
            running = metrics if running is None else jax.tree_util.tree_map(
                lambda a, b: a + b, running, metrics)
            running_steps += 1

            is_last = step == num_steps
            is_eval = is_last or step % config.train.eval_every == 0
            is_save = is_last or step % config.train.checkpoint_every == 0 \
                or preempted["flag"] or checkpoints.reached_preemption(step)
            if step % config.train.log_every == 0 or is_eval or is_save:
                averaged = {k: float(v) / running_steps for k, v in running.items()}
                if averaged.pop("nonfinite") or not np.isfinite(averaged["loss"]):
                    raise NonFiniteLossError(
                        f"Non-finite training loss or update by step {step}; "
                        f"stopping without saving. The last good checkpoint is "
                        f"step {checkpoints.latest_step()} in {workdir}. Lower "
                        f"config.optim.lr or check the data.")
                elapsed = time.perf_counter() - interval_start
                record = {f"train/{k}": v for k, v in averaged.items()}
                record["train/learning_rate"] = float(metrics["learning_rate"])
                record["tokens_per_s"] = tokens / elapsed
                record["real_tokens_per_s"] = real_tokens / elapsed
                record["steps_per_s"] = running_steps / elapsed
                record["mfu"] = record["tokens_per_s"] * flops_per_token / peak
                if is_eval:
                    record.update({f"eval/{k}": v for k, v in evaluate(
                        state.params, data_cfg.eval_split, config.train.eval_steps).items()})
                metrics_log.write(step, record)
                eta = (num_steps - step) / max(record["steps_per_s"], 1e-9)
                metrics_log.progress(step, {"loss": f"{averaged['loss']:.4f}",
                                            "tok/s": f"{record['tokens_per_s']:,.0f}",
                                            "eta": f"{eta:,.0f}s"})
                running, running_steps, tokens, real_tokens = None, 0, 0, 0
                interval_start = time.perf_counter()
                if is_save:
                    checkpoints.save(step, state, train_iter.get_state(), force=True)
                if is_eval:
                    checkpoints.save_best(step, state, train_iter.get_state(), {
                        k: v for k, v in record.items() if k.startswith("eval/")})
            if preempted["flag"] or checkpoints.reached_preemption(step):
                log.warning("Preempted at step %d: checkpoint saved, exiting.", step)
                checkpoints.wait()
                return {"preempted_at_step": step}
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        checkpoints.wait()
        checkpoints.close()
        metrics_log.close()

    # --- Final evaluation -------------------------------------------------------------
    results = {"step": step, "train_time_s": time.perf_counter() - train_start,
               "parameters": counts, "data": training_data_report(data_cfg, train_source)}
    if compiled_train_step is not None:
        results["peak_memory"] = memory.peak_memory(compiled_train_step)
    for split in (data_cfg.eval_split, data_cfg.test_split):
        results[split] = evaluate(state.params, split, config.train.final_eval_steps)
    if config.train.report_forgetting and not (mlm or generative or paired):
        forgetting = measure_forgetting(config, state.params, tok, mesh, rules)
        if forgetting is not None:
            results["forgetting"] = forgetting
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        write_learning_curves(workdir)
    return results
