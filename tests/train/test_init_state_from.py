"""A run that starts from a checkpoint draws only the parameters the checkpoint lacks:
`Trainer.init_state_from` must equal the full random init followed by loading, bitwise,
with the same shardings (LoRA factors fresh, everything else loaded)."""

import jax
import numpy as np

from configs import finetune
from train import init_from
from train.param_rules import path_string
from train.trainer import build_trainer


def _flat(tree):
    return {path_string(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_init_state_from_equals_init_then_load(monkeypatch):
    base = finetune.get_config("method=full,runlocal,size=tiny")
    base_state = build_trainer(base).init_state(seed=7)
    checkpoint = {p: np.asarray(x) for p, x in _flat(base_state.params).items()}
    monkeypatch.setattr(init_from, "load_params", lambda path: (checkpoint, path))

    config = finetune.get_config("method=lora,runlocal,size=tiny")
    trainer = build_trainer(config)
    full = trainer.init_state()
    expected, expected_report = init_from.init_params_from("a checkpoint", full.params)
    state, report = trainer.init_state_from("a checkpoint")

    assert report == expected_report
    assert report["initialised"] and all("lora_" in p for p in report["initialised"])
    got, want = _flat(state.params), _flat(expected)
    assert got.keys() == want.keys()
    for path in got:
        assert got[path].sharding == want[path].sharding, path
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), path)
    # The fresh LoRA A factors are random (not zeros), as the full init draws them.
    assert any(np.abs(np.asarray(got[p])).sum() > 0 for p in report["initialised"]
               if p.endswith("lora_a"))
    for got_leaf, want_leaf in zip(jax.tree_util.tree_leaves(state.opt_state),
                                   jax.tree_util.tree_leaves(
                                       trainer.init_opt_state(expected))):
        np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(want_leaf))
    assert int(state.step) == 0 and state.step.sharding == full.step.sharding
