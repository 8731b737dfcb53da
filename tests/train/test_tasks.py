"""The task registry: every registered task trains one step and evaluates one batch
through the one trainer builder; AOT compiles the batch each task's iterator yields; an
unknown task is refused listing the registered ones; entry points route by the registry."""

import os

import jax
import numpy as np
import pytest

from configs import multitask, pretrain_mlm, rag, retriever, scratch, vision
from launch import run_task
from train import aot, config_checks, tasks
from train.tasks import pairs
from train.tasks import prefix_lm_examples as prefix_lm
from train.trainer import build_trainer

QUESTIONS = [("What is a poodle a kind of?", "A kind of: dog. A breed of dog.", "dog"),
             ("What is a trout a kind of?", "A kind of: fish. Lives in rivers.", "fish"),
             ("What is a tulip a kind of?", "A kind of: flower. Grows from a bulb.", "flower"),
             ("What is a violin a kind of?", "A kind of: instrument. Has strings.",
              "instrument")]


def write_examples(qa_dir, kind):
    """Two epochs' worth of tiny (question, passage(s), answer) examples per split."""
    for split in ("train", "validation", "test"):
        rows = []
        for i, (question, passage, answer) in enumerate(QUESTIONS * 4):
            if kind == "pairs":
                rows.append({"question": question, "passage": passage,
                             "passage_id": str(i % len(QUESTIONS))})
            else:
                rows.append({"question": question, "passages": [passage], "answer": answer})
        (pairs if kind == "pairs" else prefix_lm).write_split(qa_dir, split, rows)


def task_config(name, data_dir, tmp_path):
    """A seconds-long config of task `name` (runlocal shapes, batch 8)."""
    if name == "classify":
        config = scratch.get_config("runlocal")
    elif name == "mlm":
        config = pretrain_mlm.get_config("runlocal")
    elif name == "multitask":  # Every WordNet task in one batch, routed by task id.
        config = multitask.get_config("runlocal,study=False")
    elif name in ("classify_image", "masked_patches"):  # The digits, as ViT patches.
        stage = "pretrain" if name == "masked_patches" else "scratch"
        config = vision.get_config(f"runlocal,stage={stage}")
    elif name == "retriever":
        config = retriever.get_config("runlocal")
        config.data.qa_dir = str(tmp_path / "qa")
        write_examples(config.data.qa_dir, "pairs")
    else:  # prefix_lm, rag: the generator's examples.
        config = rag.get_config("runlocal")
        config.task = name
        config.data.qa_dir = str(tmp_path / "qa")
        write_examples(config.data.qa_dir, "prefix_lm")
    config.data.data_dir = str(data_dir)
    config.data.batch_size = config.data.eval_batch_size = 8
    if not config.model.patch_size:  # Images: the sequence is [CLS] + the patches.
        config.data.seq_len = config.model.max_len = 64
    config.model.dropout = config.model.attention_dropout = 0.0
    config.optim.warmup_steps = 0
    config.optim.schedule = "constant"
    return config


def first_batch(config):
    task = tasks.loop_task(config.task)
    source = task.load_split(config.data, config.data.train_split)
    tok = task.tokenizer(config.data)
    return task, source, tok, next(task.train_iterator(source, tok, config.data, seed=0))


@pytest.mark.parametrize("name", tasks.registered())
def test_every_task_trains_one_step_and_evaluates_through_the_builder(
        name, wordnet_data_dir, tmp_path):
    config = task_config(name, wordnet_data_dir, tmp_path)
    config_checks.validate(config)
    task, source, tok, local = first_batch(config)
    # What AOT compiles for is exactly what the task's iterator yields.
    abstract = tasks.abstract_batch(config, sharding=None)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in abstract.items()} == {
        k: (v.shape, v.dtype) for k, v in local.items()}

    trainer = build_trainer(config, train_source=source)
    state = trainer.init_state()
    before = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)]
    with trainer.context():
        state, metrics = trainer.train_step(state, trainer.global_batch(local))
    after = jax.tree_util.tree_leaves(state.params)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    assert float(metrics["nonfinite"]) == 0.0
    changed = sum(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, after))
    assert changed > 0, "one step changed no parameter"

    evaluated = trainer.evaluate(state.params, task.eval_iterator(
        task.load_split(config.data, "validation"), tok, config.data), max_steps=1)
    assert np.isfinite(evaluated["loss"]) and 0.0 <= evaluated["accuracy"] <= 1.0


@pytest.mark.parametrize("name", ["prefix_lm", "retriever"])
def test_compile_only_compiles_the_step_the_task_runs(name, wordnet_data_dir, tmp_path):
    """`--compile_only` once built a classification batch for these tasks."""
    config = task_config(name, wordnet_data_dir, tmp_path)
    *_, local = first_batch(config)
    compiled, report = aot.compile_train_step(config)
    _, batch_info = compiled.args_info[0]
    assert {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch_info.items()} == {
        k: (v.shape, v.dtype) for k, v in local.items()}
    expected = {"prefix_lm": {"targets", "target_weights", "prefix_mask"},
                "retriever": {"passage_tokens", "passage_segment_ids", "passage_key"}}[name]
    assert expected <= set(batch_info) and "labels" not in batch_info
    assert report["task"] == name and report["per_device"]["argument_bytes"] > 0


def test_unknown_task_is_refused_listing_the_registered_ones():
    config = scratch.get_config("runlocal")
    config.task = "clasify"
    assert {"classify", "mlm", "prefix_lm", "rag", "retriever"} <= set(tasks.registered())
    with pytest.raises(ValueError, match="registered: " + ", ".join(tasks.registered())):
        config_checks.validate(config)


def test_runners_are_the_tasks_own():
    """launch.main and both sweep modes run a task through run_task.runner_of."""
    from retrieval import rag_run, retriever_run
    from train import loop

    assert run_task.runner_of(tasks.get_task("rag")) is rag_run.run
    assert run_task.runner_of(tasks.get_task("retriever")) is retriever_run.run
    for name in ("classify", "mlm", "prefix_lm"):
        assert run_task.runner_of(tasks.get_task(name)) is loop.train_and_evaluate
    assert tasks.loop_task("rag").name == "prefix_lm"


def test_no_module_compares_the_task_name_outside_the_registry():
    """Adding a task is one module and one registry entry: nothing else branches on it."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    offenders = []
    for top in ("train", "retrieval", "launch", "model"):
        for directory, _, files in os.walk(os.path.join(repo, top)):
            if os.path.join("train", "tasks") in directory:
                continue
            for file in files:
                if file.endswith(".py"):
                    text = open(os.path.join(directory, file)).read()
                    if ".task ==" in text or ".task in (" in text or ".task !=" in text:
                        offenders.append(os.path.join(directory, file))
    assert not offenders, offenders


def test_the_training_core_imports_no_experiment_config_or_entry_point():
    """DESIGN.md's layers: train/ (but train/experiments/) never imports
    train.experiments, configs, retrieval or launch."""
    import ast

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    forbidden = ("train.experiments", "configs", "retrieval", "launch")
    offenders = []
    for directory, _, files in os.walk(os.path.join(repo, "train")):
        if os.path.join("train", "experiments") in directory:
            continue
        for file in (f for f in files if f.endswith(".py")):
            path = os.path.join(directory, file)
            for node in ast.walk(ast.parse(open(path).read())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [(path, n) for n in names
                              if any(n == f or n.startswith(f + ".") for f in forbidden)]
    assert not offenders, offenders
