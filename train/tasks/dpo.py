"""DPO (task "dpo"): preference tuning of a decoder after SFT, by
train/post_training/run.py (`run_dpo`): pairs of a chosen and a rejected completion for
one prompt (post_train.pairs_file, or built from the start policy's samples), the DPO
loss against the reference (the adapter switched off)."""

from train.tasks.grpo import PostTraining
from train.tasks.registry import register


class Dpo(PostTraining):
    name = "dpo"
    runner = "train.post_training.run:run_dpo"

    def check(self, config):
        super().check(config)
        updates = config.post_train.updates_per_rollout
        if updates != 1:
            raise ValueError(f"config.post_train.updates_per_rollout={updates} with "
                             f"config.task='dpo': DPO has no rollouts; expected 1")


register(Dpo())
