"""GRPO (task "grpo"): reward-driven post-training of a decoder after SFT, by
train/post_training/run.py (`run_grpo`): G sampled completions per prompt, verifiable
rewards, group-normalised advantages, the clipped objective with a KL penalty to the
reference (the adapter switched off)."""

from train.tasks.prefix_lm import PrefixLM
from train.tasks.registry import Task, register


def check_post_training(config):
    """config.post_train's start-up checks (train/post_training/run.py) and the
    generator's (an lm head, a prompt format)."""
    from train.post_training import run  # Lazy: the runner imports the trainer.

    run.check(config)
    PrefixLM().check(config)


class Grpo(Task):
    name = "grpo"
    runner = "train.post_training.run:run_grpo"
    # Its prompts are the generator's examples (data.qa_dir, data.prompt_format): the
    # loop's view of the data (--compile_only, checks) is prefix_lm's.
    loop_task = "prefix_lm"
    prepared_corpus = False

    def check(self, config):
        check_post_training(config)


register(Grpo())
