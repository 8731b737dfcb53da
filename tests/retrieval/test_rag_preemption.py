"""A RAG run preempted (SIGTERM) while its generator trains is not finished: it returns
{"preempted_at_step": step} with the generator checkpointed and writes no results.json,
so a sweep (which counts a trial with results.json as finished) runs the trial again."""

import os
import signal

import pytest

from launch import sweep as launch_sweep
from retrieval import rag_run
from train import checkpoints
from train.experiments import sweeps

PREEMPT_AT = 2  # Generator step at which SIGTERM arrives; the run would train 6.


def write_rag_sweep_config(tmp_path, wordnet_dir):
    """configs/rag.py:runlocal shrunk to seconds before the generator's first step (a
    100-passage KB embedded in one batch, a few questions, a 500-piece tokenizer), swept
    over one seed."""
    path = tmp_path / "tiny_rag_sweep.py"
    path.write_text(f"""from configs import rag


def get_config(arg=None):
    c = rag.get_config("runlocal")
    c.data.wordnet_dir = {str(wordnet_dir)!r}
    c.data.tokenizer_sample = 2_000
    c.data.vocab_size = 500
    c.model.max_len = c.data.seq_len = 64
    c.data.max_answer_tokens = 6
    c.data.batch_size = c.data.eval_batch_size = 8
    c.train.num_steps = 6
    c.train.log_every = c.train.eval_every = c.train.checkpoint_every = 100
    c.train.eval_steps = c.train.final_eval_steps = 1
    c.rag.update(kb_size=100, max_train_questions=64, max_eval_questions=8,
                 new_info_passages=2, encode_batch_size=128, decode_batch_size=8)
    return c


def get_sweep(arg=None):
    return {{"seeds": [0], "metric": "validation/loss", "mode": "min"}}
""")
    return str(path)


def test_sigterm_during_generator_training_leaves_the_trial_unfinished(
        tmp_path, wordnet_files_dir, monkeypatch):
    config_path = write_rag_sweep_config(tmp_path, wordnet_files_dir)
    workdir = str(tmp_path / "sweep")
    trial_dir = os.path.join(workdir, "seed=0")

    real_reached = checkpoints.Checkpoints.reached_preemption

    def sigterm_at_step(self, step):  # The loop asks once a step: SIGTERM arrives then.
        if step == PREEMPT_AT:
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler), "the loop's SIGTERM handler is not installed"
            os.kill(os.getpid(), signal.SIGTERM)
        return real_reached(self, step)

    monkeypatch.setattr(checkpoints.Checkpoints, "reached_preemption", sigterm_at_step)
    returned = []
    real_run = rag_run.run
    monkeypatch.setattr(rag_run, "run", lambda c, w: returned.append(real_run(c, w))
                        or returned[-1])

    with pytest.raises(SystemExit, match="Preempted"):  # The sweep stops, to be re-run.
        launch_sweep.run_sweep(config_path, workdir)

    (results,) = returned
    assert set(results) == {"preempted_at_step"}
    step = results["preempted_at_step"]
    assert PREEMPT_AT <= step < 6
    # Saved where it stopped (so a re-run resumes), and not finished.
    assert sorted(os.listdir(os.path.join(trial_dir, "generator", "checkpoints"))) == \
        [str(step)]
    assert not os.path.exists(os.path.join(trial_dir, "results.json"))
    (trial,) = sweeps.enumerate_trials(launch_sweep.load_sweep(config_path))
    assert not sweeps.is_finished(workdir, trial)

    # Run again, the sweep runs the trial again instead of skipping it.
    again = []
    sweeps.run_trials(workdir, [trial], lambda t: again.append(t.name))
    assert again == ["seed=0"]
