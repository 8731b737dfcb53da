r"""Post-training after SFT: GRPO (reward-driven) or DPO (preference pairs) on a decoder.

  # GRPO on the RAFT+LoRA SmolLM2 run (configs/rag.py:runlocal,gen=smollm2,method=lora):
  python -m launch.main --config configs/post_train.py:algo=grpo,sft=runs/rag_smol_lora \
      --workdir runs/smol_grpo
  # DPO from pairs the SFT model's own samples give (gold answer over a wrong sample):
  python -m launch.main --config configs/post_train.py:algo=dpo,sft=runs/rag_smol_lora \
      --workdir runs/smol_dpo
  # On an accelerator: more prompts, larger groups, longer runs, the full held-out split.
  python -m launch.main --config configs/post_train.py:algo=grpo,sft=runs/rag_smol_lora,scale=full \
      --workdir runs/smol_grpo_full

`sft=` is a finished configs/rag.py run with a generator fine-tuned by a PEFT method: its
`generator/` checkpoint is the start (its LoRA merged into the base weights, a fresh
adapter of the same method trained on top: the reference is the SFT model itself, with
the new adapter switched off), its `qa/` examples the prompts (train split) and the
held-out questions (test split). Arguments: `algo=grpo|dpo`, `reward=` (a name in
train/post_training/rewards.py), `scale=cpu|full`, and the SFT run's method arguments.
"""

import json
import os

from configs import common, rag


def get_config(arg=None):
    arg = common.parse_arg(arg, algo="grpo", sft="", reward="exact_match", scale="cpu",
                           method="lora", lora_rank=8, lora_alpha=16.0,
                           lora_targets="query|value")
    if arg.algo not in ("grpo", "dpo"):
        raise ValueError(f"configs/post_train.py: algo={arg.algo!r}; expected grpo or dpo")
    if arg.scale not in ("cpu", "full"):
        raise ValueError(f"configs/post_train.py: scale={arg.scale!r}; expected cpu or full")
    c = rag.get_config(f"runlocal,gen=smollm2,method={arg.method},lora_rank={arg.lora_rank},"
                       f"lora_alpha={arg.lora_alpha},lora_targets={arg.lora_targets}")
    c.task = arg.algo
    if arg.sft:
        generator = os.path.join(arg.sft, "generator")
        c.init_from = generator if os.path.isdir(generator) else arg.sft
        c.data.qa_dir = os.path.join(arg.sft, "qa")
        recorded = os.path.join(c.init_from, "config.json")
        if os.path.isfile(recorded):  # The SFT run's shapes: the prompts it was taught on.
            with open(recorded) as f:
                data = json.load(f)["data"]
            c.data.update(seq_len=data["seq_len"], tokenizer_path=data["tokenizer_path"])
    c.post_train.reward = arg.reward
    c.optim.update(lr=1e-4 if arg.algo == "grpo" else 5e-5, warmup_steps=0,
                   schedule="constant", weight_decay=0.0)
    c.data.update(batch_size=4, eval_batch_size=16)  # DPO: pairs per step.
    c.post_train.update(group_size=4, prompts_per_step=2, max_new_tokens=12,
                        eval_questions=80, max_pairs=64)
    c.train.update(num_steps=30, eval_every=1000, checkpoint_every=10, log_every=1,
                   keep_checkpoints=2, report_forgetting=False)
    if arg.scale == "full":
        c.data.update(batch_size=32, eval_batch_size=64)
        c.post_train.update(group_size=8, prompts_per_step=16, max_new_tokens=16,
                            eval_questions=2000, max_pairs=4000)
        c.train.update(num_steps=500, eval_every=100, checkpoint_every=100, log_every=5)
    return c
