r"""Random vs Bayesian (TPE) search over a seconds-long training run: the measured
comparison of the README's sweep section (train/experiments/sweeps.py, launch/sweep.py).

  python -m launch.sweep --config configs/search.py --workdir runs/search --compare_searches=3
  python -m launch.sweep --config configs/search.py:search=bayes --workdir runs/bayes

The trial: training from scratch at runlocal scale (2 layers, hidden 64) for `steps`
steps of `batch` glosses cut to 32 pieces, scored on the first 2,048 glosses of the
validation split (10-30 s a trial on a 2-core CPU) by its loss: at this budget most
settings still predict the commonest supersense, so accuracy is flat where the loss is
not. The space: learning rate, warm-up, weight decay and dropout. Arguments: `search=random|bayes`
(the get_sweep's; --compare_searches runs both), `trials=` per search, `steps=`, `batch=`.
"""

from configs import common, scratch

ARGS = dict(search="random", trials=12, steps=100, batch=32)


def get_config(arg=None):
    arg = common.parse_arg(arg, **ARGS)
    c = scratch.get_config("runlocal")
    c.data.batch_size = arg.batch
    c.data.seq_len = 32  # Covers most glosses (median 13 pieces); halves runlocal's cost.
    c.data.eval_split = "validation[:2048]"
    c.data.test_split = "test[:2048]"
    c.train.num_steps = arg.steps
    c.train.eval_every = arg.steps
    c.train.checkpoint_every = arg.steps
    c.train.log_every = arg.steps
    c.train.progress = False
    return c


def get_sweep(arg=None):
    arg = common.parse_arg(arg, **ARGS)
    return dict(random={"optim.lr": ("loguniform", 1e-4, 1e-1),
                        "optim.warmup_steps": ("int", 0, arg.steps // 2),
                        "optim.weight_decay": ("loguniform", 1e-4, 0.3),
                        "model.dropout": ("uniform", 0.0, 0.4)},
                num_trials=arg.trials, search=arg.search,
                metric="validation/loss", mode="min")
