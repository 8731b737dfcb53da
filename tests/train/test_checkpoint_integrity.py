"""Verified checkpoints: a damaged latest step is set aside and the one before it restored.

A run saves steps 10 and 20 of a tiny train state (params + Adam moments, and the data
iterator's JSON state as the loop passes it); the tests damage step 20 the way shared
storage and preemptible machines do, and resume.
"""

import glob
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from train import checkpoints as ckpt
from train.steps import TrainState

TX = optax.adamw(1e-3)


def train_cfg(keep=3):
    return ml_collections.ConfigDict(dict(
        keep_checkpoints=keep, best_metric="eval/loss", best_mode="min"))


def make_state(step, nan=False):
    key = jax.random.key(step)
    params = {"dense": {"kernel": jax.random.normal(key, (64, 48)),
                        "bias": jnp.full(48, step / 10)},
              "embed": jax.random.normal(jax.random.fold_in(key, 1), (128, 64))}
    if nan:
        params["dense"]["kernel"] = params["dense"]["kernel"].at[3, 5].set(jnp.nan)
    return TrainState(step=jnp.array(step, jnp.int32), params=params, opt_state=TX.init(params))


def data_state(step):  # What a grain iterator's get_state() gives: a JSON-able dict.
    return {"next_index": step * 8, "worker_count": 0}


ABSTRACT = jax.eval_shape(lambda: make_state(0))


def save_run(workdir, steps=(10, 20), nan_at=None):
    checkpoints = ckpt.Checkpoints(str(workdir), train_cfg())
    for step in steps:
        checkpoints.save(step, make_state(step, nan=step == nan_at), data_state(step),
                         force=True)
    checkpoints.close()


def largest_array_file(workdir, step):
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"),
                      recursive=True)
    return max(files, key=os.path.getsize)


def flip_bytes(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for i in range(len(data) // 2, len(data) // 2 + 4):
            data[i] ^= 0x01
        f.seek(0)
        f.write(data)


def truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def assert_state_equal(restored, step):
    want = make_state(step)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def resume(workdir):
    checkpoints = ckpt.Checkpoints(str(workdir), train_cfg())
    try:
        return checkpoints.restore_latest_intact(ABSTRACT), checkpoints.latest_step()
    finally:
        checkpoints.close()


def set_aside(workdir, step):
    return glob.glob(os.path.join(workdir, "checkpoints", f"{step}.corrupt-*"))


@pytest.fixture
def strata_warnings(caplog):
    caplog.set_level(logging.WARNING, logger="strata")
    return caplog


def test_each_saved_step_gets_a_manifest_that_stays_valid(tmp_path):
    save_run(tmp_path, steps=(10, 20, 30))
    for step in (10, 20, 30):
        step_dir = os.path.join(tmp_path, "checkpoints", str(step))
        manifest = json.load(open(os.path.join(step_dir, ckpt.MANIFEST)))
        assert manifest["algorithm"] == "sha256" and manifest["total_bytes"] > 0
        assert any(name.startswith("state/") for name in manifest["files"])
        # Orbax writes nothing into a finalised step afterwards: the manifest holds.
        assert ckpt.verify_manifest(step_dir) == ("verified", None)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20", "30"]


def test_manifest_follows_the_async_save_without_a_wait(tmp_path):
    checkpoints = ckpt.Checkpoints(str(tmp_path), train_cfg())
    checkpoints.save(10, make_state(10), data_state(10), force=True)
    checkpoints.save_best(10, make_state(10), data_state(10), {"eval/loss": 1.0})
    deadline = time.time() + 60  # Training goes on; a thread writes it once orbax is done.
    manifests = [tmp_path / "checkpoints" / "10" / ckpt.MANIFEST,
                 tmp_path / "best" / "10" / ckpt.MANIFEST]
    while not all(m.exists() for m in manifests):
        assert time.time() < deadline, "no manifest after the save finalised"
        time.sleep(0.05)
    checkpoints.close()
    for manifest in manifests:
        assert ckpt.verify_manifest(str(manifest.parent)) == ("verified", None)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_latest_step_is_set_aside_and_the_previous_restored(
        tmp_path, strata_warnings, damage):
    save_run(tmp_path)
    path = largest_array_file(tmp_path, 20)
    {"flip": flip_bytes, "truncate": truncate, "delete": os.remove}[damage](path)

    (step, state, data), latest = resume(tmp_path)

    assert step == latest == 10  # latest_step() now names the step that was restored.
    assert_state_equal(state, 10)
    assert data == data_state(10)
    [aside] = set_aside(tmp_path, 20)  # Renamed, not deleted: the bytes are still there.
    assert os.path.exists(os.path.join(aside, os.path.relpath(
        path, os.path.join(tmp_path, "checkpoints", "20")))) == (damage != "delete")
    note = json.load(open(os.path.join(aside, ckpt.SET_ASIDE_NOTE)))
    assert note["step"] == 20 and os.path.basename(path) in note["reason"]
    warning = " ".join(r.getMessage() for r in strata_warnings.records)
    assert "step 20" in warning and "set aside" in warning and os.path.basename(path) in warning
    assert sorted(os.listdir(tmp_path / "checkpoints"))[0] == "10"


def test_nan_in_latest_params_is_rejected(tmp_path, strata_warnings):
    save_run(tmp_path, nan_at=20)  # Saved as written: the manifest verifies, the values not.

    (step, state, data), _ = resume(tmp_path)

    assert step == 10 and data == data_state(10)
    assert_state_equal(state, 10)
    assert set_aside(tmp_path, 20)
    assert "non-finite" in strata_warnings.text and "params/dense/kernel" in strata_warnings.text


def test_unverified_step_that_orbax_cannot_read_falls_back(tmp_path, strata_warnings):
    save_run(tmp_path)
    os.remove(os.path.join(tmp_path, "checkpoints", "20", ckpt.MANIFEST))  # As older code.
    truncate(largest_array_file(tmp_path, 20))

    (step, _, _), _ = resume(tmp_path)

    assert step == 10 and set_aside(tmp_path, 20)
    assert "orbax cannot read it" in strata_warnings.text


def test_step_without_manifest_still_restores(tmp_path, strata_warnings):
    save_run(tmp_path)
    for step in (10, 20):  # A run saved by code from before manifests.
        os.remove(os.path.join(tmp_path, "checkpoints", str(step), ckpt.MANIFEST))

    (step, state, data), latest = resume(tmp_path)

    assert step == latest == 20 and data == data_state(20)
    assert_state_equal(state, 20)
    assert not set_aside(tmp_path, 20)
    assert "restored unverified" in strata_warnings.text


def test_all_steps_corrupt_is_a_clear_error_and_stays_one(tmp_path):
    save_run(tmp_path)
    for step in (10, 20):
        flip_bytes(largest_array_file(tmp_path, step))
    directory = os.path.join(tmp_path, "checkpoints")
    with pytest.raises(ckpt.CorruptCheckpointError, match="No intact checkpoint") as error:
        resume(tmp_path)
    assert directory in str(error.value)
    assert len(set_aside(tmp_path, 10)) == len(set_aside(tmp_path, 20)) == 1
    # Run again: still refused, never a silent fresh start over the set-aside steps.
    with pytest.raises(ckpt.CorruptCheckpointError, match="set aside before"):
        resume(tmp_path)


def test_fresh_workdir_restores_nothing(tmp_path):
    assert resume(tmp_path) == (None, None)


def test_other_model_shape_is_a_mismatch_not_corruption(tmp_path):
    save_run(tmp_path)
    other = jax.eval_shape(lambda: make_state(0)).replace(
        params={**ABSTRACT.params, "embed": jax.ShapeDtypeStruct((256, 64), jnp.float32)})
    checkpoints = ckpt.Checkpoints(str(tmp_path), train_cfg())
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"embed \(128, 64\) -> \(256, 64\)"):
        checkpoints.restore_latest_intact(other)
    checkpoints.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]  # Nothing moved.


def test_restore_of_a_named_step_refuses_corrupt_bytes_without_moving_them(tmp_path):
    save_run(tmp_path)
    flip_bytes(largest_array_file(tmp_path, 20))
    checkpoints = ckpt.Checkpoints(str(tmp_path), train_cfg())
    with pytest.raises(ckpt.CorruptCheckpointError, match="sha256 mismatch"):
        checkpoints.restore(ABSTRACT)
    state, data = checkpoints.restore(ABSTRACT, step=10)
    checkpoints.close()
    assert_state_equal(state, 10)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]


def test_best_is_verified_when_restored(tmp_path):
    checkpoints = ckpt.Checkpoints(str(tmp_path), train_cfg())
    for step, loss in ((10, 2.0), (20, 1.0)):
        checkpoints.save_best(step, make_state(step), data_state(step), {"eval/loss": loss})
    checkpoints.close()
    assert os.listdir(tmp_path / "best") == ["20"]
    assert ckpt.newest_verified_step_dir(str(tmp_path / "best")) == str(tmp_path / "best" / "20")
    flip_bytes(max(glob.glob(str(tmp_path / "best" / "20" / "state" / "**" / "d" / "*"),
                             recursive=True), key=os.path.getsize))
    assert ckpt.newest_verified_step_dir(str(tmp_path / "best")) is None  # Readers skip it.
    checkpoints = ckpt.Checkpoints(str(tmp_path), train_cfg())
    with pytest.raises(ckpt.CorruptCheckpointError, match="best"):
        checkpoints.restore_best(ABSTRACT)
    checkpoints.close()
    assert glob.glob(str(tmp_path / "best" / "20.corrupt-*"))
