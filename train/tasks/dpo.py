"""DPO (task "dpo"): preference tuning of a decoder after SFT, by
train/post_training/run.py (`run_dpo`): pairs of a chosen and a rejected completion for
one prompt (post_train.pairs_file, or built from the start policy's samples), the DPO
loss against the reference (the adapter switched off)."""

from train.tasks.grpo import check_post_training
from train.tasks.registry import Task, register


class Dpo(Task):
    name = "dpo"
    runner = "train.post_training.run:run_dpo"
    loop_task = "prefix_lm"  # Its prompts are the generator's examples (see grpo.py).
    prepared_corpus = False

    def check(self, config):
        check_post_training(config)


register(Dpo())
