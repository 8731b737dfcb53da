r"""Multi-task fine-tuning on WordNet: several tasks on one backbone, one adapter set and
one classification head per task (routed by task id, model/multitask.py), trained on a
mixture — against one model per task.

  python -m launch.main --config configs/multitask.py --workdir runs/multitask
  python -m launch.main --config configs/multitask.py:backbone=full --workdir runs/mt_full
  python -m launch.main --config configs/multitask.py:runlocal --workdir /tmp/mt_local

The study (config.study; train/experiments/multitask.py) pre-trains a masked-LM
backbone once (`mlm_steps`; 0 = start from `--config.init_from` or from scratch), then per
seed trains one model per task (`steps` each) and one multi-task model on the mixture of
all tasks (`steps` x tasks: the same examples per task), and writes W/results.json and
W/report.md: per-task test accuracy (mean ± sd, 95% t-interval over seeds, paired t-test
single vs multi), parameters stored, and the cost of adding a task.
`configs/multitask.py:study=False` trains the multi-task model alone (one run of the loop:
task "multitask", train/tasks/multitask.py).

Arguments: `tasks=supersense|pos|synset_size` (train/tasks/multitask.py TASKS, in task-id
order), `backbone=frozen` (only the per-task adapters and heads train: the PEFT setting)
or `full` (the shared backbone trains too), `adapter_dim=64`, `temperature=1.0` (task
sampling p_t ∝ n_t^(1/T); WordNet's tasks label the same synsets, so their sizes are
equal and T matters only with unequal `data.label_fraction`s), `steps=300` (per task),
`seeds=3`, `mlm_steps=1200`, `lr_scale=10` (on the method's learning rate: small models
take larger steps), `size=tiny`, `runlocal` (seconds-long smoke run).
"""

import ml_collections

from configs import common, finetune, pretrain_mlm
from model import finetune_methods

# backbone -> the fine-tuning method (model/finetune_methods.py) that trains it.
BACKBONES = {"frozen": "adapters", "full": "full"}
# Each WordNet task's class count (train/tasks/multitask.py TASKS; its check compares).
TASK_CLASSES = {"supersense": 45, "pos": 4, "synset_size": 3}


def add_task_fields(c, tasks, *, temperature=1.0, eval_examples_per_task=0):
    """The multitask task's fields (train/tasks/multitask.py) on config `c`, and a model
    with one slot per task."""
    names = tuple(tasks)
    unknown = [n for n in names if n not in TASK_CLASSES]
    if unknown:
        raise ValueError(f"tasks={'|'.join(names)} has {unknown}; expected names from "
                         f"{'|'.join(TASK_CLASSES)}")
    classes = tuple(TASK_CLASSES[n] for n in names)
    c.task = "multitask"
    c.model.num_tasks = len(names)
    c.model.task_classes = classes
    c.model.num_classes = max(classes)
    c.data.tasks = names
    c.data.train_tasks = ()  # () = all of data.tasks.
    c.data.mixture_temperature = float(temperature)
    c.data.replay_tasks = ()
    c.data.replay_fraction = 0.02
    c.data.replay_share = 0.0
    c.data.eval_examples_per_task = eval_examples_per_task
    c.train.report_forgetting = False  # The tasks' own accuracies measure it here.
    return c


def pretrain_config(size, mlm_steps, runlocal):
    """The masked-LM pre-training run the study starts from (as the stages demo's)."""
    p = pretrain_mlm.get_config(f"size={size}" + (",runlocal" if runlocal else ""))
    p.train.num_steps = mlm_steps
    if not runlocal:
        p.data.seq_len = 64
        p.optim.lr = 3e-3 if size == "tiny" else 1e-3
        p.optim.warmup_steps = max(mlm_steps // 20, 1)
        p.train.eval_every = p.train.checkpoint_every = max(mlm_steps // 2, 1)
        p.train.eval_steps, p.train.final_eval_steps, p.train.log_every = 8, 20, 100
    return p


def finetune_base(size, method, runlocal, lr_scale, **method_args):
    """configs/finetune.py's config for `method` on the WordNet glosses."""
    args = ",".join(f"{k}={v}" for k, v in method_args.items())
    c = finetune.get_config(f"method={method},size={size}" + (",runlocal" if runlocal else "")
                            + (f",{args}" if args else ""))
    c.optim.lr = finetune_methods.get(method).lr * lr_scale
    return c


def get_config(arg=None):
    arg = common.parse_arg(arg, size="tiny", tasks="supersense|pos|synset_size",
                           backbone="frozen", adapter_dim=64, temperature=1.0, steps=300,
                           seeds=3, mlm_steps=1200, lr_scale=10.0, runlocal=False,
                           study=True)
    if arg.backbone not in BACKBONES:
        raise ValueError(f"backbone={arg.backbone!r}; expected one of {sorted(BACKBONES)}")
    method = BACKBONES[arg.backbone]
    # Adapters without their LayerNorms: every trained parameter then belongs to one task.
    extra = dict(adapter_dim=arg.adapter_dim, adapter_norms=False) if method == "adapters" \
        else {}
    c = finetune_base(arg.size, method, arg.runlocal, arg.lr_scale, **extra)
    c.model.adapter_dim = arg.adapter_dim  # backbone=full: the adapters train with it.
    add_task_fields(c, arg.tasks.split("|"), temperature=arg.temperature,
                    eval_examples_per_task=200 if arg.runlocal else 2000)
    steps = 20 if arg.runlocal else arg.steps
    c.train.num_steps = steps * len(c.data.tasks)
    if not arg.runlocal:
        c.data.batch_size = 32
        c.train.eval_steps, c.train.log_every = 8, 50
    c.optim.warmup_steps = max(steps // 10, 1)
    if not arg.study:
        return c
    c.study = ml_collections.ConfigDict(dict(
        seeds=tuple(range(1 if arg.runlocal else arg.seeds)),
        steps_per_task=steps,
        pretrain=pretrain_config(arg.size, 10 if arg.runlocal else arg.mlm_steps,
                                 arg.runlocal) if arg.mlm_steps else {},
        backbone=arg.backbone,
    ))
    return c
