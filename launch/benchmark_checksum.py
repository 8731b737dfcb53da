r"""The cost of verified checkpoints: save, manifest, verify and restore, side by side.

Builds a BERT-base train state (configs/scratch.py size=base: its real parameter shapes
and the optimizer's moments, filled with random numbers, since random bytes compress no
better than trained ones), saves it with train/checkpoints.py's `Checkpoints` into a temp
dir, and times each phase of each round:

- save_blocking: `save()` until it returns (device-to-host copy; the write goes on async);
- save_finalised: until orbax has committed the step (the rest of the write);
- manifest_wait: what `wait()` adds after that: the rest of the background thread that
  hashes the step once orbax has finalised it (0 when hashing kept up);
- manifest: the whole manifest, timed alone: sha256 + size of every file, written (process
  0; in a run a thread does it while training goes on);
- verify: the manifest checked against the files (every byte read and hashed again);
- restore_orbax: orbax's restore alone (what resuming cost before);
- restore_verified: `restore_latest_intact`: verify + metadata check + restore +
  non-finite check (what resuming costs now).

The files were just written, so reads come from the page cache; a cold read adds the
disk's read time (size / read bandwidth) to `verify`.

    python -m launch.benchmark_checksum --rounds 2
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from configs import scratch
from train import checkpoints as ckpt
from train import model_setup


def base_state(size, seed=0):
    """-> (state with random values, abstract state, bytes) of `size`'s train state."""
    config = scratch.get_config(f"size={size}")
    model = model_setup.build_model(config)
    tx, _, _ = model_setup.build_optimizer(config, model)
    _, abstract = model_setup.abstract_train_state(model, tx, config.data.seq_len)
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if np.issubdtype(leaf.dtype, np.floating):
            return rng.standard_normal(leaf.shape, dtype=np.float32).astype(leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    state = jax.tree_util.tree_map(lambda leaf: jax.device_put(fill(leaf)), abstract)
    nbytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state))
    return state, abstract, nbytes, config.train


def measure_round(workdir, train_cfg, state, abstract, step):
    """-> {phase: seconds} of saving `state` as `step`, manifesting, verifying, restoring."""
    times = {}

    def lap(name, fn):
        start = time.perf_counter()
        result = fn()
        times[name] = time.perf_counter() - start
        return result

    checkpoints = ckpt.Checkpoints(workdir, train_cfg)
    lap("save_blocking", lambda: checkpoints.save(step, state, {"next_index": step},
                                                  force=True))
    lap("save_finalised", checkpoints.latest.wait_until_finished)
    times["save_finalised"] += times["save_blocking"]
    lap("manifest_wait", checkpoints.write_pending_manifests)
    step_dir = checkpoints.step_dir(checkpoints.latest, step)
    lap("manifest", lambda: ckpt.write_manifest(step_dir))  # Hashed again, in full.
    verdict = lap("verify", lambda: ckpt.verify_manifest(step_dir))
    assert verdict == ("verified", None), verdict
    lap("restore_orbax", lambda: jax.block_until_ready(checkpoints.latest.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      data=ocp.args.JsonRestore())).state))
    restored = lap("restore_verified", lambda: jax.block_until_ready(
        checkpoints.restore_latest_intact(abstract)))
    assert restored[0] == step, restored[0]
    lap("nonfinite_check", lambda: ckpt.nonfinite_leaves(restored[1]))
    checkpoints.close()
    with open(os.path.join(step_dir, ckpt.MANIFEST)) as f:
        manifest = json.load(f)
    return times, manifest


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="base")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", default=None, help="Parent of the temp workdir.")
    args = parser.parse_args()

    state, abstract, nbytes, train_cfg = base_state(args.size)
    train_cfg.keep_checkpoints = 2
    workdir = tempfile.mkdtemp(prefix="strata-checksum-", dir=args.dir)
    free = shutil.disk_usage(workdir).free
    print(json.dumps({"size": args.size, "state_bytes": nbytes, "leaves": len(
        jax.tree_util.tree_leaves(state)), "workdir": workdir, "free_disk_bytes": free,
        "cpus": os.cpu_count()}))
    if free < 3 * nbytes:
        raise SystemExit(f"{workdir}: {free / 2**30:.1f} GiB free, need {3 * nbytes / 2**30:.1f}")
    try:
        for round_ in range(args.rounds):
            times, manifest = measure_round(workdir, train_cfg, state, abstract, round_ + 1)
            gb = manifest["total_bytes"] / 1e9
            print(json.dumps({"round": round_, "checkpoint_gb": round(gb, 3),
                              "files": len(manifest["files"]),
                              **{f"{k}_s": round(v, 2) for k, v in times.items()},
                              "hash_gb_per_s": round(gb / times["verify"], 2)}))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
