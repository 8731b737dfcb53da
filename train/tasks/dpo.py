"""DPO (task "dpo"): preference tuning of a decoder after SFT, by
train/post_training/run.py (`run_dpo`): pairs of a chosen and a rejected completion for
one prompt (post_train.pairs_file, or built from the start policy's samples), the DPO
loss against the reference (the adapter switched off)."""

from train.tasks.grpo import PostTraining
from train.tasks.registry import register


class Dpo(PostTraining):
    name = "dpo"
    runner = "train.post_training.run:run_dpo"


register(Dpo())
