"""Which parameters train, and at what learning rate: ordered regex rules over param paths.

The one mechanism (big_vision / MaxText style) behind freezing and per-parameter learning
rates. `config.optim.param_rules` is a tuple of `(regex, multiplier)` pairs:

* A parameter's path is its "/"-joined dict keys, e.g.
  "encoder/block_0/attention/query/kernel", and a rule applies when
  `re.fullmatch(regex, path)` matches: the WHOLE path, so "encoder/block_0" alone
  matches nothing; write "encoder/block_0/.*".
* The FIRST matching rule wins; later rules are not consulted for that parameter.
* Its multiplier (a float) scales that parameter's learning rate. 0.0 or None freezes it:
  no optimizer state, an exactly-zero update, and (with `make_train_step(trainable=...)`)
  no gradient computed for it at all.
* A parameter no rule matches is trainable with multiplier 1.0.
* A rule that matches no parameter at all is an error (it is almost always a typo); the
  message names the rule and lists a few real paths.

`config.optim.layerwise_lr_decay` (0 disables) adds ELECTRA/BEiT-style layer-wise decay
for N blocks: "encoder/block_i/..." gets decay**(N - i) (i counted from 0, so the top
block gets decay**1), the embeddings (token / position / type embeddings and the post-LN
embedding norm) decay**(N + 1), and everything else (heads, a pre-LN final norm) 1.0. It
is generated as rules (`layerwise_decay_rules`) and multiplies the regex rules' multiplier
(the product); it never freezes and its rules need not all match (e.g. no type embedding).
The tied MLM decoder is the token embedding, so it gets the embedding's multiplier.

Everything here is pure and works on real arrays, `jax.ShapeDtypeStruct`s, and Flax's
boxed (`nn.Partitioned`) params, a box counting as one parameter.
"""

import re

import jax
import numpy as np
from flax.core import meta

EMBEDDING_PATTERN = r"encoder/(token_embed|position_embed|type_embed|embed_norm)/.*"
BLOCK_PATTERN = r"encoder/block_(\d+)/.*"


def _is_box(x):
    return isinstance(x, meta.AxisMetadata)


def _key_name(key):
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_string(path):
    """A `tree_flatten_with_path` key path -> "encoder/block_0/mlp/wi/kernel"."""
    return "/".join(_key_name(k) for k in path)


def map_paths(fn, params):
    """A tree like `params` whose leaves are `fn(path_string)`; boxes count as leaves."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: fn(path_string(path)), params, is_leaf=_is_box)


def param_paths(params):
    return [path_string(p) for p, _ in
            jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]]


def normalize_rules(rules):
    """Config rules (tuples or lists) -> tuple of (compiled regex, multiplier or None)."""
    out = []
    for rule in rules or ():
        if isinstance(rule, str) or len(rule) != 2:
            raise ValueError(
                f"config.optim.param_rules entry {rule!r} is not a (regex, multiplier) pair")
        pattern, multiplier = rule
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"config.optim.param_rules regex {pattern!r} is invalid: {e}") from e
        if multiplier is not None:
            multiplier = float(multiplier)
            if not multiplier >= 0.0:  # Also rejects NaN.
                raise ValueError(f"config.optim.param_rules rule {pattern!r} has multiplier "
                                 f"{multiplier}; expected >= 0 (0 or None freezes)")
        out.append((regex, multiplier))
    return tuple(out)


def check_rules(params, rules):
    """Raises if a rule matches no parameter, naming it and listing some real paths."""
    paths = param_paths(params)
    for regex, multiplier in normalize_rules(rules):
        if not any(regex.fullmatch(p) for p in paths):
            sample = "\n  ".join(paths[:8] + (["..."] if len(paths) > 8 else []))
            raise ValueError(
                f"config.optim.param_rules rule ({regex.pattern!r}, {multiplier}) matches no "
                f"parameter (paths are '/'-joined and matched with re.fullmatch). "
                f"{len(paths)} parameters, e.g.:\n  {sample}")


def rule_multiplier(path, rules):
    """The first matching rule's multiplier (None/0.0: frozen); 1.0 when none matches."""
    for regex, multiplier in rules:
        if regex.fullmatch(path):
            return 0.0 if multiplier is None else multiplier
    return 1.0


def num_blocks(params):
    """N: the number of distinct `encoder/block_i` in `params`."""
    return len({m.group(1) for p in param_paths(params)
                if (m := re.fullmatch(BLOCK_PATTERN, p))})


def layerwise_decay_rules(decay, num_layers):
    """The layer-wise decay as ordered (regex, multiplier) rules; () when decay is 0."""
    if not decay:
        return ()
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"config.optim.layerwise_lr_decay={decay}; expected in (0, 1]")
    blocks = tuple((rf"encoder/block_{i}/.*", decay ** (num_layers - i))
                   for i in range(num_layers))
    return blocks + ((EMBEDDING_PATTERN, decay ** (num_layers + 1)),)


def lr_multipliers(params, rules=(), layerwise_decay=0.0, num_layers=None, *, check=True):
    """Per-leaf float learning-rate multiplier (0.0 = frozen): regex rule x layer decay."""
    rules = normalize_rules(rules)
    if check:
        check_rules(params, rules)
    if num_layers is None:
        num_layers = num_blocks(params)
    decay_rules = normalize_rules(layerwise_decay_rules(layerwise_decay, num_layers))

    def multiplier(path):
        m = rule_multiplier(path, rules)
        return m * rule_multiplier(path, decay_rules) if m else 0.0
    return map_paths(multiplier, params)


def trainable_mask(params, rules=(), *, check=True):
    """Per-leaf bool: False where the first matching rule's multiplier is 0.0 or None."""
    rules = normalize_rules(rules)
    if check:
        check_rules(params, rules)
    return map_paths(lambda path: rule_multiplier(path, rules) > 0.0, params)


def trainable_count(params, mask, and_mask=None):
    """Number of scalars in the leaves `mask` (and `and_mask`, if given) mark trainable."""
    leaves, flags = jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(mask)
    if len(leaves) != len(flags):
        raise ValueError(f"mask has {len(flags)} leaves but params {len(leaves)}")
    if and_mask is not None:
        flags = [a and b for a, b in zip(flags, jax.tree_util.tree_leaves(and_mask))]
    return int(sum(int(np.prod(p.shape)) for p, m in zip(leaves, flags) if m))


def partition(params, mask):
    """(trainable, frozen): two trees like `params`, each with None where the other holds."""
    def take(keep):
        return jax.tree_util.tree_map(lambda m, p: p if m == keep else None, mask, params)
    return take(True), take(False)


def combine(trainable, frozen):
    """Inverse of `partition`."""
    return jax.tree_util.tree_map(lambda t, f: f if t is None else t, trainable, frozen,
                                  is_leaf=lambda x: x is None)
