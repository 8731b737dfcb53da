"""The command line: bad input fails at start-up naming the key or path; dry run."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(*args, timeout=300):
    run = subprocess.run([sys.executable, "-m", "launch.main", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    return run.returncode, run.stdout + run.stderr


RUNLOCAL = "--config=configs/scratch.py:runlocal"


@pytest.mark.parametrize("override, expected", [
    ("--config.optim.lrr=1", 'Did you mean "lr"'),
    ("--config.optimm.lr=1", 'Did you mean "optim"'),
    ("--config.optim.lr=fast", "could not convert string to float"),
])
def test_bad_override_names_the_key(tmp_path, override, expected):
    code, output = main(RUNLOCAL, f"--workdir={tmp_path}", override)
    assert code != 0
    last = output.strip().splitlines()[-1]
    assert last.startswith("FATAL") and expected in last and override in last


def test_bad_config_argument(tmp_path):
    code, output = main("--config=configs/scratch.py:runlokal", f"--workdir={tmp_path}")
    assert code != 0 and "Unknown config argument runlokal" in output
    assert "accepted: [runlocal, size]" in output


def test_bad_choice_names_the_key(tmp_path):
    code, output = main(RUNLOCAL, f"--workdir={tmp_path}", "--config.model.norm=middle")
    assert code != 0 and "config.model.norm='middle'; expected one of ('pre', 'post')" in output


def test_mesh_that_does_not_divide_the_devices(tmp_path):
    code, output = main(RUNLOCAL, f"--workdir={tmp_path}", "--config.mesh.data=3",
                        f"--config.data.data_dir={tmp_path / 'data'}")
    assert code != 0 and "does not divide the" in output and "config.mesh" in output


def test_batch_that_does_not_divide_the_mesh(tmp_path):
    code, output = main(RUNLOCAL, f"--workdir={tmp_path}", "--config.data.batch_size=12",
                        "--config.optim.grad_accum_steps=1",
                        f"--config.data.data_dir={tmp_path / 'data'}")
    assert code != 0 and "config.data.batch_size=12 is not divisible" in output


def test_missing_wordnet_directory(tmp_path):
    code, output = main(RUNLOCAL, f"--workdir={tmp_path}",
                        f"--config.data.wordnet_dir={tmp_path / 'nowhere'}",
                        f"--config.data.data_dir={tmp_path / 'data'}")
    assert code != 0 and "wordnet-base" in output and str(tmp_path / "nowhere") in output


def test_unreadable_tokenizer_file(tmp_path, wordnet_data_dir):
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a sentencepiece model")
    code, output = main(RUNLOCAL, f"--workdir={tmp_path / 'run'}",
                        f"--config.data.tokenizer_path={garbage}",
                        f"--config.data.data_dir={wordnet_data_dir}")
    assert code != 0 and str(garbage) in output and "sentencepiece" in output


def test_dry_run_bert_base(tmp_path):
    code, output = main("--config=configs/scratch.py:size=base", f"--workdir={tmp_path}",
                        "--dry_run")
    assert code == 0, output
    counts = json.load(open(tmp_path / "params.json"))
    assert counts["total"] == 108_891_648 + 768 * 768 + 768 + 768 * 45 + 45
    assert not os.path.exists(tmp_path / "checkpoints")  # Nothing trained or saved.
    assert f'"total": {counts["total"]}' in output
