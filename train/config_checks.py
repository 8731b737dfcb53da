"""Start-up validation: a wrong value fails in seconds, naming the key and what it takes."""

from model.attention import ATTENTION_IMPLS, MASK_MODES
from model.initializers import INITS
from model.transformer import HEADS
from train import tasks
from train.data import pipeline
from train.data.augmentation import check_rates
from train.data.sampling import SAMPLINGS
from train.loop import check_early_stopping
from train.optimizer import SCHEDULES
from train.regularizers import TOWARD, check_strengths

CHOICES = {
    "model.attention_mask": MASK_MODES,
    "model.init": INITS,
    "model.norm": ("pre", "post"),
    "model.pooling": ("cls", "mean"),
    "model.attention_impl": ATTENTION_IMPLS,
    "model.remat": ("none", "full", "dots_saveable", "dots_with_no_batch_dims"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "optim.schedule": SCHEDULES,
    "data.source": ("wordnet", "tfds", "local", "images"),
    "data.sampling": SAMPLINGS,
    "optim.regularize_toward": TOWARD,
    "data.tokenizer": ("sentencepiece", "wordpiece", "gguf"),
    "prng_impl": ("", "threefry2x32", "rbg", "unsafe_rbg"),
}


def _get(config, dotted):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def validate(config):
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            raise ValueError(f"config.{key}={value!r}; expected one of {tuple(allowed)}")
    unknown_heads = set(config.model.heads) - set(HEADS)
    if unknown_heads:
        raise ValueError(f"config.model.heads has {sorted(unknown_heads)}; expected from {HEADS}")
    task = tasks.get_task(config.task)  # An unknown task lists the registered ones.
    task.check(config)
    if task.loop_task:
        tasks.get_task(task.loop_task).check(config)
    check_prefix_lm_fraction(config, tasks.loop_task(config.task))
    impl, m = config.model.attention_impl, config.model
    if impl in ("cudnn", "splash") and m.attention_dropout > 0:
        raise ValueError(
            f"config.model.attention_impl={impl!r} cannot drop attention probabilities but "
            f"config.model.attention_dropout={m.attention_dropout}; set it to 0.0 or use "
            f"'xla' ('auto' falls back to 'xla' while training with it)")
    if impl == "splash" and (m.attention_mask == "prefix" or m.prefix_length):
        kind = ("attention_mask='prefix'" if m.attention_mask == "prefix"
                else f"prefix_length={m.prefix_length}")
        raise ValueError(f"config.model.attention_impl='splash' cannot express the mask of "
                         f"config.model.{kind}; use 'xla', 'cudnn' or 'auto'")
    if config.data.seq_len > config.model.max_len:
        raise ValueError(
            f"config.data.seq_len={config.data.seq_len} exceeds config.model.max_len="
            f"{config.model.max_len}")
    pipeline.check_batch_sizes(config)
    accum = config.optim.grad_accum_steps
    if accum < 1 or config.data.batch_size % accum:
        raise ValueError(
            f"config.optim.grad_accum_steps={accum} must be >= 1 and divide "
            f"config.data.batch_size={config.data.batch_size}")
    check_rates(config.data)  # token_dropout / token_substitution in [0, 1).
    l2, l1, toward = check_strengths(config.optim)
    if toward == "init" and (l2 or l1) and not config.init_from:
        raise ValueError(
            "config.optim.regularize_toward='init' anchors to the pre-trained weights but "
            "config.init_from is empty (it would anchor to the random init); set "
            "config.init_from or use regularize_toward='zero'")
    for key in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
        if config.train[key] < 1:
            raise ValueError(f"config.train.{key}={config.train[key]} must be >= 1")
    check_early_stopping(config.train)
    pipeline.check_length_buckets(config.data)
    if config.model.hidden % config.model.num_heads and config.model.head_dim in (-1, None):
        raise ValueError(
            f"config.model.hidden={config.model.hidden} is not divisible by "
            f"config.model.num_heads={config.model.num_heads}; set config.model.head_dim")


def check_prefix_lm_fraction(config, task):
    """UniLM's mix (data.prefix_lm_fraction; train/tasks/unilm.py) is a masked-LM option."""
    fraction = config.data.prefix_lm_fraction
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"config.data.prefix_lm_fraction={fraction} must be in [0, 1)")
    if fraction > 0 and not task.mixes_prefix_lm:
        raise ValueError(f"config.data.prefix_lm_fraction={fraction} mixes prefix-LM rows "
                         f"into masked-LM pre-training, but config.task={config.task!r}; "
                         f"set it to 0.0 or use task 'mlm'")
