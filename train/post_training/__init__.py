"""Post-training of a decoder after supervised fine-tuning: GRPO (Shao et al. 2024) and
DPO (Rafailov et al. 2023), tasks "grpo" and "dpo" (train/tasks/grpo.py, dpo.py) run by
train/post_training/run.py over the shared model, optimizer, mesh and checkpoints.

  logprobs   per-token / per-sequence log-probs of completion tokens; the reference
             policy (the PEFT modules switched off, or a frozen copy)
  grpo       group-normalised advantages, the clipped objective with the k3 KL penalty
  dpo        the DPO loss
  rewards    named verifiable rewards (exact match, gold contained, a format bonus)
  rollout    prompts, G sampled completions per prompt, the update batch
  run        the runner: init from the SFT run, the compiled steps, the loop, evaluation
"""
