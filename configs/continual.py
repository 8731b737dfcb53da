r"""Continual fine-tuning on WordNet: tasks arrive one after another, every task is tested
after each (accuracy matrix, average forgetting, backward transfer), with mitigations:
replay, L2-SP toward the previous weights, EWC (train/experiments/continual.py).

  python -m launch.main --config configs/continual.py --workdir runs/continual
  python -m launch.main --config configs/continual.py:runlocal --workdir /tmp/cl_local
  python -m launch.main --config configs/continual.py:mlm_steps=0 \
      --config.init_from=runs/multitask/pretrain --workdir runs/continual

One backbone is fully fine-tuned throughout, with one classification head per task
(model/multitask.py routes each row to its task's head), in the order of `tasks`.

Arguments: `tasks=supersense|synset_size|pos` (arrival order; train/tasks/multitask.py
TASKS), `methods=naive|replay|l2sp|ewc`, `steps=500` (per task), `seeds=3`,
`replay_fraction=0.02` (the buffer: this fraction of each earlier task's training
examples), `replay_share=0.2` (the buffer's share of the rows of later tasks' batches),
`l2sp=1.0` (L2-SP strength), `ewc=1000.0` (EWC's λ), `fisher_examples=1024` (per task),
`phases=0` (train only the first k tasks; 0 = all), `mlm_steps=1200` (pre-train the
backbone first; 0 = `--config.init_from` or scratch),
`lr_scale=10`, `size=tiny`, `runlocal` (seconds-long smoke run).
"""

import ml_collections

from configs import common, multitask


def get_config(arg=None):
    arg = common.parse_arg(arg, size="tiny", tasks="supersense|synset_size|pos",
                           methods="naive|replay|l2sp|ewc", steps=500, seeds=3,
                           replay_fraction=0.02, replay_share=0.2, l2sp=1.0, ewc=1000.0,
                           fisher_examples=1024, mlm_steps=1200, lr_scale=10.0,
                           phases=0, runlocal=False)
    c = multitask.finetune_base(arg.size, "full", arg.runlocal, arg.lr_scale)
    multitask.add_task_fields(c, arg.tasks.split("|"),
                              eval_examples_per_task=200 if arg.runlocal else 2000)
    c.data.replay_fraction = arg.replay_fraction
    c.data.replay_share = arg.replay_share
    steps = 20 if arg.runlocal else arg.steps
    c.train.num_steps = steps
    if not arg.runlocal:
        c.data.batch_size = 32
        c.train.eval_steps, c.train.log_every = 8, 50
    c.optim.warmup_steps = max(steps // 10, 1)
    # AdamW's decoupled decay would shrink earlier tasks' heads (no gradient reaches
    # them) and so forget for a reason other than the shared weights' drift.
    c.optim.weight_decay = 0.0
    c.optim.ewc_strength = 0.0  # Set per phase by the runner (train/ewc.py).
    c.optim.ewc_fisher = ""
    c.continual = ml_collections.ConfigDict(dict(
        seeds=tuple(range(1 if arg.runlocal else arg.seeds)),
        methods=tuple(arg.methods.split("|")),
        l2sp_strength=arg.l2sp, ewc_strength=arg.ewc,
        fisher_examples=64 if arg.runlocal else arg.fisher_examples,
        phases=arg.phases,  # Train the first `phases` tasks only; 0 = all.
        pretrain=multitask.pretrain_config(arg.size, 10 if arg.runlocal else arg.mlm_steps,
                                           arg.runlocal) if arg.mlm_steps else {},
    ))
    return c
