"""Ahead-of-time compile (`launch.main --compile_only`): BERT-base's train step compiles
for 8 devices with fsdp=8 and reports per-device memory without allocating the state."""

import json
import os
import subprocess
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_base_compiles_for_fsdp8_without_allocating(tmp_path):
    # CPU code generation at -O0: the memory figures come from the HLO buffers,
    # which code optimisation does not change, and it compiles several times faster.
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                        "--xla_backend_optimization_level=0"}
    run = subprocess.run(
        [sys.executable, "-m", "launch.main", "--config=configs/scratch.py:size=base",
         f"--workdir={tmp_path}", "--compile_only", "--topology=cpu:8",
         "--config.mesh.data=1", "--config.mesh.fsdp=8"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    report = json.load(open(tmp_path / "compile.json"))
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert report["parameters"] > 109_000_000  # BERT-base with a 45-class head.
    assert report["state_bytes"] == report["param_bytes"] + report["optimizer_state_bytes"] + 4
    per_device = report["per_device"]
    # Each device holds its eighth of params and Adam state (fsdp), nothing replicated.
    assert per_device["argument_bytes"] > report["param_bytes"] / 8
    assert per_device["argument_bytes"] < report["state_bytes"] / 8 * 1.05
    assert per_device["total_bytes"] >= per_device["argument_bytes"] + per_device["temp_bytes"]
    assert report["compile_s"] > 0
    # Nothing was allocated: no live arrays beyond a PRNG key. (The process's peak RSS is
    # reported but not asserted: XLA's compiler alone took 1 to 5 GB across machines.)
    assert report["live_array_bytes"] < 1024
    assert report["host_peak_rss_bytes"] > 0


def test_topology_devices():
    from train import aot

    assert len(aot.topology_devices("cpu:4")) == 4
    assert aot.topology_devices("") == jax.devices()
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=64"):
        aot.topology_devices("cpu:64")
    if jax.default_backend() != "tpu":  # No libtpu here: a clear error, not a crash.
        with pytest.raises(ValueError, match="--topology=tpu:v5e:2x2"):
            aot.topology_devices("tpu:v5e:2x2")
