"""Ensembles of fine-tuned runs: members re-evaluated from disk, logits averaged."""

import numpy as np
import pytest

from configs import finetune
from train import loop
from train.ensemble import classification_metrics, evaluate_ensemble, load_run, split_logits


def tiny_run(data_dir, workdir, seed, method):
    config = finetune.get_config(f"method={method},runlocal,size=tiny")
    config.seed = seed
    config.data.data_dir = str(data_dir)
    config.train.update(dict(num_steps=8, eval_every=8, checkpoint_every=8, log_every=8,
                             eval_steps=1, progress=False))
    # Slices (tfds syntax) keep the repeated whole-split evaluations to seconds.
    config.data.update(eval_split=SPLIT, test_split="test[:256]")
    return loop.train_and_evaluate(config, str(workdir))


SPLIT = "validation[:1000]"


@pytest.mark.slow
def test_ensemble_members_match_their_runs_and_logits_average(wordnet_data_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    results = {str(a): tiny_run(wordnet_data_dir, a, 0, "full"),
               str(b): tiny_run(wordnet_data_dir, b, 1, "lora")}
    report = evaluate_ensemble([str(a), str(b)], SPLIT, "latest")
    for member in report["members"]:  # The loop's own final evaluation, another code path.
        own = results[member["workdir"]][SPLIT]
        assert member["accuracy"] == pytest.approx(own["accuracy"], abs=1e-6)
        assert member["macro_f1"] == pytest.approx(own["macro_f1"], abs=1e-6)
    logits = []
    for workdir in (a, b):
        config, model, params = load_run(str(workdir), "latest")
        member_logits, labels = split_logits(config, model, params, SPLIT)
        logits.append(member_logits)
    np.testing.assert_allclose(report["mean_logits"], (logits[0] + logits[1]) / 2, atol=1e-6)
    expected = classification_metrics((logits[0] + logits[1]) / 2, labels, 45)
    assert report["ensemble"] == expected
    assert report["ensemble"]["examples"] == len(labels) == 1000

    alone = evaluate_ensemble([str(a), str(a)], SPLIT, "latest")  # Two equal members.
    assert alone["ensemble"]["accuracy"] == pytest.approx(results[str(a)][SPLIT][
        "accuracy"], abs=1e-6)


def test_a_directory_without_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        evaluate_ensemble([str(tmp_path)])
