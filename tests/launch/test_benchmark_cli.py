"""launch/benchmark.py's measurement on a sharded mesh of the 8 fake CPU devices
(conftest.py): what it returns is measured, not echoed from the config."""

import json

import pytest

from launch import benchmark

MESH = {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.slow  # Compiles a sharded train step: ~10-40 s on 2 shared cores.
def test_measure_one_mesh_reports_speed_and_memory():
    config = benchmark.make_config("tiny", batch_size=8, seq_len=32, mesh=MESH)
    config.model.num_layers = 1  # Compile time is most of this test.
    row = benchmark.measure(config, steps=2, warmup=0)
    assert row["mesh"] == MESH and row["devices"] == 8 and row["platform"] == "cpu"
    assert row["batch_size"] == 8 and row["seq_len"] == 32
    assert row["tokens_per_s"] > 0 and row["step_time_s"] > 0 and row["mfu"] > 0
    assert row["compile_time_s"] > 0
    # fsdp and tensor split the parameters; the step holds them, their gradients and
    # two AdamW moments: more than the parameters on that device.
    assert row["params_bytes_per_device"] < row["params_bytes"]
    assert row["compiled_step_bytes"] > 3 * row["params_bytes_per_device"]
    json.dumps(row)  # One JSON line per measurement.


def test_mesh_the_model_cannot_take_is_a_row_not_a_crash(capsys):
    class Args:
        attention_impl, dtype, steps, warmup, rounds = "xla", "float32", 1, 0, 1

    # tensor=8 cannot split the tiny model's 4 heads.
    row = benchmark.run_measurement(Args, "tiny", "tensor=8", batch_size=8, seq_len=32)
    assert "does not split 8 ways" in row["error"] and "CPU figures" in row["note"]
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["error"] == row["error"]
    assert benchmark.parse_mesh("data=2,tensor=4") == {"data": 2, "tensor": 4}
