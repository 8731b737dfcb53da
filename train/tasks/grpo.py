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


class PostTraining(Task):
    """What GRPO and DPO share: the runner's checks and its compiled update step."""

    # Its prompts are the generator's examples (data.qa_dir, data.prompt_format): the
    # loop's view of the data (checks) is prefix_lm's; the step it compiles is the
    # runner's update (--dry_run, --compile_only).
    loop_task = "prefix_lm"
    prepared_corpus = False

    def check(self, config):
        check_post_training(config)

    def step_to_compile(self, config, devices):
        from train.post_training import run

        return run.abstract_update_step(config, devices)

    def describe_step(self, config, setup):
        from train.post_training import run

        return run.describe_update_step(config, setup)


class Grpo(PostTraining):
    name = "grpo"
    runner = "train.post_training.run:run_grpo"


register(Grpo())
