"""Images through the shared loop: a ViT step on 8 fake devices equals 1 device, the
masked-patch loss against a numpy reference over masked patches only, the vision
configs' checks, and SimMIM pre-training -> LoRA fine-tuning through init_from."""

import json

import jax
import numpy as np
import pytest
from flax import linen as nn

from configs import vision
from configs.common import LOGICAL_AXIS_RULES
from train import config_checks, model_setup, partitioning, tasks
from train.data.pipeline import to_global_batch
from train.loop import train_and_evaluate
from train.optimizer import make_optimizer
from train.steps import make_train_step
from train.tasks import masked_patches

STEPS, BATCH = 4, 16


def tiny_vit(stage="scratch", **arg):
    extra = "".join(f",{k}={v}" for k, v in arg.items())
    c = vision.get_config(f"stage={stage},runlocal{extra}")
    c.model.dropout = 0.0
    c.data.batch_size = BATCH
    c.optim.update(dict(lr=1e-2, warmup_steps=1))
    return c


def image_batches(task, seed=0):
    """Two batches in turn of random images; labels from the mean brightness of the top
    half, so the loss can fall. `task` adds its fields (masks, targets)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        pixels = rng.random((BATCH, 8, 8, 1)).astype(np.float32)
        batch = {"pixels": pixels, "segment_ids": np.ones((BATCH, 17), np.int32),
                 "labels": (pixels[:, :4].mean((1, 2, 3)) * 20).astype(np.int32) % 10,
                 "example_weight": np.ones(BATCH, np.float32)}
        if task == "masked_patches":
            batch = masked_patches.mask_batch(batch, rng.random((BATCH, 16)), 2, 8)
        out.append(batch)
    return [out[i % 2] for i in range(STEPS)]


def loss_trajectory(config, devices):
    mesh = partitioning.make_mesh(config.mesh, devices)
    model = model_setup.build_model(config)
    tx, schedule = make_optimizer(config.optim, STEPS)
    task = tasks.get_task(config.task)
    boxed, _ = model_setup.abstract_train_state(model, tx, config.data.seq_len)
    shardings = model_setup.state_shardings(boxed, mesh, LOGICAL_AXIS_RULES)
    state = model_setup.init_train_state(model, tx, config.data.seq_len, 0, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        step = jax.jit(make_train_step(model, tx, task.objective(config), seed=0,
                                       schedule=schedule),
                       in_shardings=(shardings, partitioning.batch_sharding(mesh)),
                       out_shardings=(shardings, partitioning.replicated(mesh)),
                       donate_argnums=(0,))
        losses = []
        for batch in image_batches(config.task):
            state, metrics = step(state, to_global_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
    return np.array(losses), state


def test_vit_step_on_eight_devices_matches_one():
    assert len(jax.devices()) == 8, "conftest.py should give 8 fake CPU devices"
    config = tiny_vit("scratch")
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    one, _ = loss_trajectory(config, jax.devices()[:1])
    assert np.ptp(one) > 1e-3, one  # The steps move: the comparison is not of constants.
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    eight, state = loss_trajectory(config, jax.devices())
    np.testing.assert_allclose(eight, one, rtol=2e-4, atol=2e-5)
    kernel = state.params["encoder"]["patch_embed"]["projection"]["kernel"]
    assert len({tuple((i.start, i.stop) for i in s.index)
                for s in kernel.addressable_shards}) == 2  # embed over fsdp.


def test_masked_patch_loss_counts_masked_patches_only():
    rng = np.random.default_rng(0)
    pixels = rng.random((3, 8, 8, 1)).astype(np.float32)
    pixels[0, 0:2, 0:2] = 0.25  # A constant patch: target all zeros.
    batch = {"pixels": pixels, "example_weight": np.array([1.0, 1.0, 0.0], np.float32)}
    batch = masked_patches.mask_batch(batch, rng.random((3, 16)), 2, 5)
    predicted = rng.normal(size=(3, 16, 4)).astype(np.float32)  # Every patch's output.
    outputs = {"pixels": np.take_along_axis(predicted, batch["mlm_positions"][..., None] - 1,
                                            axis=1)}
    loss_sum, weight, sums = masked_patches.MaskedPatches().loss(outputs, batch)

    errors, beats = [], []
    for b in range(2):  # Row 2 has weight 0.
        for k in range(16):
            r, c = divmod(k, 4)
            patch = pixels[b, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(-1).astype(np.float64)
            target = (patch - patch.mean()) / np.sqrt(patch.var() + 1e-6)
            if k + 1 in batch["mlm_positions"][b]:
                errors.append(np.mean((predicted[b, k] - target) ** 2))
                beats.append(errors[-1] < np.mean(target ** 2))
    assert len(errors) == 10
    np.testing.assert_allclose(float(loss_sum) / float(weight), np.mean(errors), rtol=1e-5)
    assert float(weight) == 10 and float(sums["correct"]) == sum(beats)


@pytest.mark.parametrize("stage", ["scratch", "pretrain", "finetune"])
def test_vision_configs_pass_the_startup_checks(stage):
    config_checks.validate(vision.get_config(f"stage={stage}"))


@pytest.mark.parametrize("change, message", [
    (lambda c: c.model.update(dict(patch_size=0)), "config.model.patch_size > 0"),
    (lambda c: c.data.update(dict(seq_len=16)), "config.data.seq_len=16"),
    (lambda c: c.data.update(dict(source="wordnet")), "config.data.source='images'"),
    (lambda c: c.data.update(dict(image_noise=-1.0)), "config.data.image_noise"),
])
def test_bad_vision_configs_name_the_key(change, message):
    config = vision.get_config("stage=scratch")
    change(config)
    with pytest.raises(ValueError, match=message):
        config_checks.validate(config)


def test_patch_argument_must_divide_the_image():
    with pytest.raises(ValueError, match="config.model.patch_size=3 does not divide"):
        config_checks.validate(vision.get_config("stage=scratch,patch=3"))


def test_pretrain_then_lora_finetune_through_the_loop(tmp_path, monkeypatch):
    """The loop, checkpoints and init_from carry SimMIM's encoder into a LoRA classifier;
    the mask vector and the pixel head are dropped, LoRA and the classifier start fresh."""
    monkeypatch.setenv("STRATA_DATA_DIR", str(tmp_path / "tfds"))
    pre = vision.get_config("stage=pretrain,runlocal,steps=2")
    pre.train.update(dict(progress=False, eval_steps=1, final_eval_steps=1))
    results = train_and_evaluate(pre, str(tmp_path / "pre"))
    assert results["validation"]["loss"] < 5.0 and results["data"]["train_examples"] == 1439
    ft = vision.get_config("stage=finetune,method=lora,runlocal,steps=2,lora_rank=2")
    ft.init_from = str(tmp_path / "pre")
    ft.data.label_fraction = 0.1
    ft.train.update(dict(progress=False, eval_steps=1, final_eval_steps=1))
    results = train_and_evaluate(ft, str(tmp_path / "ft"))
    report = json.loads((tmp_path / "ft" / "init_from.json").read_text())
    assert "encoder/patch_embed/projection/kernel" in report["loaded"]
    assert "encoder/block_1/attention/query/kernel" in report["loaded"]
    assert report["dropped"] == ["encoder/patch_embed/mask", "pixel_head/reconstruction/bias",
                                 "pixel_head/reconstruction/kernel"]
    assert results["data"]["train_examples"] == 143  # Stratified 10% of 1,439.
    assert 0.0 <= results["test"]["accuracy"] <= 1.0
    # LoRA rank 2 on query and value of 2 blocks: A [64, 2] + B [2, 64] each.
    assert results["parameters"]["trainable_without_head"] == 2 * 2 * (64 * 2 + 2 * 64)
