"""Outputs never endanger inputs: export, embed and ensemble refuse an output over a run
they read, write beside the target and rename, and replace an old output only at the end."""

import hashlib
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from test_embed import fake_run  # tests/launch/test_embed.py: a tiny BERT-shaped run.

from launch import export
from model import hf_bert
from train import safe_output
from train.init_from import load_params
from train.safe_output import UnsafeOutputError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def snapshot(root):
    """{relative path: sha256} of every file under `root`."""
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return files


def leftovers(directory, name):
    return [p for p in os.listdir(directory) if p.startswith(f".{name}.")]


@pytest.fixture
def run(tmp_path):
    """(workdir, its params, a sibling run) under tmp_path/runs."""
    runs = tmp_path / "runs"
    _, _, params = fake_run(runs / "ft")
    sibling = runs / "other"
    sibling.mkdir()
    (sibling / "config.json").write_text("{}")
    return runs / "ft", params, sibling


def assert_loads(workdir, params):
    flat, _ = load_params(str(workdir))
    np.testing.assert_array_equal(flat["encoder/token_embed/embedding"],
                                  np.asarray(params["encoder"]["token_embed"]["embedding"]))


@pytest.mark.parametrize("where, relation", [("run", "is"), ("parent", "holds"),
                                             ("inside", "lies inside")])
def test_export_onto_its_run_is_refused_and_the_runs_stay_intact(run, where, relation):
    workdir, params, sibling = run
    output = {"run": workdir, "parent": workdir.parent,
              "inside": workdir / "checkpoints" / "exported"}[where]
    before, sibling_before = snapshot(workdir), snapshot(sibling)
    with pytest.raises(UnsafeOutputError) as error:
        export.export(str(workdir), str(output), overwrite=True)
    message = str(error.value)
    assert f"--output {output} {relation} {workdir} (--workdir)" in message
    assert snapshot(workdir) == before and snapshot(sibling) == sibling_before
    assert_loads(workdir, params)


def test_export_refuses_an_output_over_the_runs_tokenizer(run, tmp_path):
    workdir, _, _ = run  # fake_run's vocab.txt lies in the run; move it out of it.
    vocab = tmp_path / "shared" / "vocab.txt"
    vocab.parent.mkdir()
    os.replace(workdir / "vocab.txt", vocab)
    config = (workdir / "config.json").read_text().replace(str(workdir / "vocab.txt"),
                                                            str(vocab))
    (workdir / "config.json").write_text(config)
    with pytest.raises(UnsafeOutputError, match="holds .*vocab.txt .*tokenizer"):
        export.export(str(workdir), str(vocab.parent), overwrite=True)
    assert vocab.is_file()


def test_an_existing_file_as_output_directory_is_a_clear_error(run, tmp_path):
    workdir, _, _ = run
    (tmp_path / "exported").write_text("notes")
    with pytest.raises(NotADirectoryError, match="--output .*exported is an existing file"):
        export.export(str(workdir), str(tmp_path / "exported"), overwrite=True)
    assert (tmp_path / "exported").read_text() == "notes"
    with pytest.raises(NotADirectoryError, match="notes.txt is a file, not a directory"):
        (tmp_path / "notes.txt").write_text("")
        export.export(str(workdir), str(tmp_path / "notes.txt" / "exported"))


def test_overwrite_replaces_the_old_export_only_once_the_new_one_is_complete(
        run, tmp_path, monkeypatch):
    workdir, _, _ = run
    out = tmp_path / "exported"
    export.export(str(workdir), str(out))
    old = snapshot(out)

    # 1. Writing the new export fails: the old one is untouched, no temporary remains.
    def failing_save(directory, flat, model_cfg):
        (open(os.path.join(directory, hf_bert.WEIGHTS), "wb")).close()
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(hf_bert, "save", failing_save)
        with pytest.raises(OSError, match="No space"):
            export.export(str(workdir), str(out), overwrite=True)
    assert snapshot(out) == old and not leftovers(tmp_path, "exported")

    # 2. Moving the complete new export into place fails: the old one is still there.
    moves_in = []

    def refuse_first_move_in(move):
        def wrapped(src, dst, *args, **kwargs):
            if os.path.abspath(dst) == str(out) and not moves_in:
                moves_in.append(src)
                raise OSError("Input/output error")
            return move(src, dst, *args, **kwargs)
        return wrapped

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", refuse_first_move_in(os.rename))
        patch.setattr(os, "replace", refuse_first_move_in(os.replace))
        with pytest.raises(OSError, match="Input/output"):
            export.export(str(workdir), str(out), overwrite=True)
    assert moves_in and snapshot(out) == old and not leftovers(tmp_path, "exported")

    # 3. It succeeds: replaced, nothing left beside it.
    (out / "stale.txt").write_text("from an older export")
    export.export(str(workdir), str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "vocab.txt"]
    assert not leftovers(tmp_path, "exported")


def test_exported_files_are_ordinary_readable_files(run, tmp_path):
    workdir, _, _ = run
    umask = os.umask(0o077)  # Even under a private umask: an export is for sharing.
    try:
        export.export(str(workdir), str(tmp_path / "exported"))
    finally:
        os.umask(umask)
    out = tmp_path / "exported"
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    for name in os.listdir(out):
        mode = os.lstat(out / name).st_mode
        assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o644, name


def cli(module, *args):
    run = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    return run.returncode, run.stdout + run.stderr


def a_run(path):
    """Enough of a run directory for the refusals, which come before anything is read."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize("output, expected", [
    ("run/vectors.npy", "lies inside {run} (--init_from)"),
    ("run/vectors", "lies inside {run} (--init_from)"),  # np.save appends .npy.
    ("lines.npy", "is {lines} (--input)"),
    ("out.npy", "is an existing directory"),
])
def test_embed_refuses_outputs_over_its_inputs(tmp_path, output, expected):
    run = a_run(tmp_path / "run")
    lines = tmp_path / "lines.npy"  # A text file, whatever its name.
    lines.write_text("a gloss\nanother\n")
    (tmp_path / "out.npy").mkdir()
    before = snapshot(tmp_path)
    code, log = cli("launch.embed", f"--init_from={run}", f"--input={lines}",
                    f"--output={tmp_path / output}")
    last = log.strip().splitlines()[-1]
    assert code != 0 and last.startswith("FATAL:"), log
    assert expected.format(run=run, lines=lines) in last
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("output, expected", [
    ("b/ensemble.json", "--output {b}/ensemble.json lies inside {b} (--workdirs)"),
    ("b", "--output {b} is {b} (--workdirs)"),
    (".", "--output {root} holds {a} (--workdirs)"),
    ("elsewhere", "--output {root}/elsewhere is an existing directory"),
])
def test_ensemble_refuses_outputs_over_its_runs(tmp_path, output, expected):
    a, b = a_run(tmp_path / "a"), a_run(tmp_path / "b")
    (tmp_path / "elsewhere").mkdir()
    before = snapshot(tmp_path)
    code, log = cli("launch.ensemble", f"--workdirs={a},{b}",
                    f"--output={os.path.normpath(tmp_path / output)}")
    last = log.strip().splitlines()[-1]
    assert code != 0 and last.startswith("FATAL:"), log
    assert expected.format(a=a, b=b, root=tmp_path) in last
    assert snapshot(tmp_path) == before


def test_the_ensemble_report_defaults_beside_the_runs(tmp_path):
    from launch.ensemble import report_path

    a = a_run(tmp_path / "runs" / "a")
    assert report_path("", [str(a)]) == str(tmp_path / "runs" / "ensemble.json")


def test_relations_follow_symlinks(tmp_path):
    target = a_run(tmp_path / "run")
    os.symlink(target, tmp_path / "alias")
    with pytest.raises(UnsafeOutputError, match="is .*run"):
        safe_output.check_output_apart(tmp_path / "alias", [("--workdir", target)])
    safe_output.check_output_apart(tmp_path / "runner", [("--workdir", target)])  # A prefix.


def test_atomic_save_npy_is_readable_and_leaves_no_temporary(tmp_path):
    umask = os.umask(0o077)
    try:
        path = safe_output.atomic_save_npy(tmp_path / "sub" / "v", np.arange(3.0))
    finally:
        os.umask(umask)
    assert path == str(tmp_path / "sub" / "v.npy")
    np.testing.assert_array_equal(np.load(path), np.arange(3.0))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert os.listdir(tmp_path / "sub") == ["v.npy"]
