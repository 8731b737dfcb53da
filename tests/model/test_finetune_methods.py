"""The table of fine-tuning methods (model/finetune_methods.py): the configs make exactly
what it says, it matches the methods as they were written out before the table (an
independent copy below), export refuses exactly the methods it marks unmergeable, and
PEFT_OFF removes every fine-tuning module."""

import json
import re

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from configs import finetune, retriever
from configs.ablations import stages
from launch import export
from model import config as model_config
from model import finetune_methods, hf_bert
from model.finetune_methods import METHODS, PEFT_OFF, PEFT_PARAMS
from model.transformer import Model, resolve
from train import param_rules

# Non-default arguments for each method (the defaults are tested too).
VARIANTS = {
    "freeze": ["freeze_blocks=1", "freeze_blocks=0,freeze_embeddings=false", "freeze_blocks=4"],
    "bitfit": ["norm_offsets"],
    "layerwise_lr_decay": ["layer_decay=0.5"],
    "lora": ["lora_rank=4,lora_alpha=8.0,lora_targets=query|key|value|out|wi|wo"],
    "adapters": ["adapter_dim=16,adapter_norms=false"],
    "prompt_tuning": ["prompt_length=5"],
    "prefix_tuning": ["prefix_length=7,prefix_mlp_dim=32"],
    "p_tuning": ["prompt_length=4,prompt_encoder_dim=32"],
}
CASES = [(m, a) for m in METHODS for a in ["", *VARIANTS.get(m, [])]]


# The methods as configs/finetune.py wrote them out before the table: the reference.
EMBEDDINGS = r"encoder/(token_embed|patch_embed|position_embed|type_embed|embed_norm)/.*"
HEAD, NORMS = r"classify_head/.*", r".*norm/(scale|bias)"
REFERENCE_PEFT_PARAMS = {
    "lora": r".*/lora_[ab]",
    "ia3": r".*/ia3_(key|value|mlp)",
    "prompt_tuning": r"encoder/prompt",
    "prefix_tuning": r".*/prefix_(key|value)|encoder/prefix_mlp/.*",
    "p_tuning": r"encoder/prompt_encoder/.*",
    "adapters": r"encoder/block_\d+/(attention|mlp)_adapter/.*",
}
REFERENCE_LR = {"full": 2e-4, "freeze": 2e-4, "layerwise_lr_decay": 2e-4, "adapters": 5e-4}


def reference_rules(arg, num_layers):
    if arg.method in ("full", "layerwise_lr_decay"):
        return ()
    if arg.method == "linear_probe":
        return ((r"encoder/.*", 0.0),)
    if arg.method == "freeze":
        rules = [(EMBEDDINGS, 0.0)] if arg.freeze_embeddings else []
        if arg.freeze_blocks:
            blocks = "|".join(str(i) for i in range(arg.freeze_blocks))
            rules.append((rf"encoder/block_({blocks})/.*", 0.0))
        return tuple(rules)
    if arg.method == "bitfit":
        return ((HEAD, 1.0), (r".*norm/bias", 1.0 if arg.norm_offsets else 0.0),
                (r".*/bias", 1.0), (r".*", 0.0))
    if arg.method == "adapters":
        return ((REFERENCE_PEFT_PARAMS["adapters"], 1.0), (HEAD, 1.0),
                (NORMS, 1.0 if arg.adapter_norms else 0.0), (r".*", 0.0))
    return ((REFERENCE_PEFT_PARAMS[arg.method], 1.0), (HEAD, 1.0), (r".*", 0.0))


def reference_model_fields(arg):
    return {"lora": dict(lora_rank=arg.lora_rank, lora_alpha=arg.lora_alpha,
                         lora_targets=arg.lora_targets),
            "ia3": dict(ia3=True),
            "prompt_tuning": dict(prompt_length=arg.prompt_length),
            "prefix_tuning": dict(prefix_length=arg.prefix_length,
                                  prefix_mlp_dim=arg.prefix_mlp_dim),
            "p_tuning": dict(prompt_length=arg.prompt_length,
                             prompt_encoder_dim=arg.prompt_encoder_dim),
            "adapters": dict(adapter_dim=arg.adapter_dim)}.get(arg.method, {})


def config_arg(method, extra):
    return f"method={method}" + (f",{extra}" if extra else "")


@pytest.mark.parametrize("method, extra", CASES)
def test_finetune_config_is_the_table_and_the_reference(method, extra):
    arg = finetune.parse_method_arg(config_arg(method, extra), size="mini", runlocal=False,
                                    lr_scale=1.0, hf="")
    config = finetune.get_config(config_arg(method, extra))
    entry = finetune_methods.get(method)
    layers = config.model.num_layers
    rules = entry.param_rules(arg, layers)
    assert rules == reference_rules(arg, layers)
    assert tuple(map(tuple, config.optim.param_rules)) == rules
    fields = entry.model_fields(arg)
    assert fields == reference_model_fields(arg)
    assert {k: config.model[k] for k in fields} == fields
    assert entry.lr == REFERENCE_LR.get(method, 1e-3) == config.optim.lr
    decay = arg.layer_decay if method == "layerwise_lr_decay" else 0.0
    assert config.optim.layerwise_lr_decay == decay
    assert entry.optim_fields(arg) == ({"layerwise_lr_decay": decay} if decay else {})


@pytest.mark.parametrize("method, extra", [c for c in CASES if c[0] != "linear_probe"])
def test_retriever_config_is_the_table_without_the_head(method, extra):
    config = retriever.get_config(config_arg(method, extra))
    arg = finetune.parse_method_arg(config_arg(method, extra), size="mini", runlocal=False,
                                    hf="minilm")
    layers = config.model.num_layers
    assert layers == 6  # MiniLM's: the rules are made for the imported model.
    want = tuple(r for r in reference_rules(arg, layers) if r[0] != HEAD)
    assert tuple(map(tuple, config.optim.param_rules)) == want
    assert finetune_methods.get(method).param_rules(arg, layers, head=False) == want
    fields = reference_model_fields(arg)
    assert {k: config.model[k] for k in fields} == fields
    assert config.optim.lr == (3e-5 if method in ("full", "freeze", "layerwise_lr_decay")
                               else 1e-3)


def test_arguments_are_shared_and_each_method_reads_only_its_own():
    # One colon argument per name; a name two methods take (prompt_length: prompt tuning
    # and P-tuning) means the same, with the same default.
    assert {k for m in METHODS.values() for k in m.args} == set(finetune_methods.ARGS)
    for method in METHODS.values():
        assert all(finetune_methods.ARGS[k] == v for k, v in method.args.items()), method
    for method in METHODS.values():  # Callables get only their own args: a KeyError else.
        method.param_rules({}, 4)
        method.model_fields()
        method.optim_fields()
    assert list(METHODS) == list(finetune.METHODS)
    assert stages.METHODS == tuple(m for m in METHODS if m != "full")
    assert PEFT_PARAMS == REFERENCE_PEFT_PARAMS
    # PEFT_OFF is the model's default: a config without `method=` has no PEFT module.
    assert PEFT_OFF == {k: model_config.DEFAULTS[k] for k in PEFT_OFF}


def test_unknown_method_fails_listing_the_methods():
    for make in (lambda: finetune_methods.get("adapter"),
                 lambda: finetune.get_config("method=adapter"),
                 lambda: retriever.get_config("method=adapter")):
        with pytest.raises(ValueError, match="method='adapter'") as error:
            make()
        assert all(name in str(error.value) for name in METHODS), error.value


def tiny_model_config(method, extra=""):
    config = finetune.get_config(f"{config_arg(method, extra)},runlocal,size=tiny")
    config.model.update(dict(type_vocab_size=2, vocab_size=40, max_len=32, dropout=0.0,
                             attention_dropout=0.0))
    return config


def param_shapes(model_cfg):
    model = Model(resolve(model_cfg))
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, 8), jnp.int32))["params"])
    return set(param_rules.param_paths(nn.unbox(tree)))


@pytest.mark.parametrize("method, extra",
                         [(m, "") for m in METHODS] + [("prefix_tuning", "prefix_mlp_dim=16")])
def test_peft_off_removes_every_fine_tuning_module(method, extra):
    model_cfg = tiny_model_config(method, extra).model
    plain = param_shapes(tiny_model_config("full").model)
    paths = param_shapes(model_cfg)
    added = paths - plain
    assert finetune_methods.active(model_cfg) == ((method,) if METHODS[method].off else ())
    if METHODS[method].params:  # What it adds is what its regex names.
        assert added and all(re.fullmatch(METHODS[method].params, p) for p in added)
    else:
        assert not added
    model_cfg.update(PEFT_OFF)
    assert finetune_methods.active(model_cfg) == ()
    assert param_shapes(model_cfg) == plain
    assert not [p for p in plain for r in PEFT_PARAMS.values() if re.fullmatch(r, p)]


def fake_run(workdir, method):
    """A strata workdir (config.json + checkpoint) of a tiny BERT-shaped `method` run."""
    config = tiny_model_config(method)
    workdir.mkdir()
    vocab = workdir / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                               + [f"w{i}" for i in range(35)]) + "\n")
    config.data.update(dict(tokenizer="wordpiece", tokenizer_path=str(vocab), seq_len=16))
    model = Model(resolve(config.model))
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]))
    # Zeros: which parameters exist is what export decides on, not their values.
    params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(str(workdir / "checkpoints" / "1" / "state"), {"params": params})


@pytest.mark.parametrize("method", list(METHODS))
def test_export_merges_exactly_what_the_table_says(tmp_path, method):
    fake_run(tmp_path / "run", method)
    out = tmp_path / "exported"
    if not METHODS[method].merges:
        fields = "|".join(METHODS[method].off)
        with pytest.raises(hf_bert.HfCheckpointError, match=rf"config\.model\.({fields})="):
            export.export(str(tmp_path / "run"), str(out))
        assert not out.exists()
        return
    export.export(str(tmp_path / "run"), str(out))
    flat, fields, unmapped = hf_bert.load(str(out))
    assert not unmapped and json.loads((out / "config.json").read_text())["hidden_size"] == 64
    assert not [p for p in flat for r in PEFT_PARAMS.values() if re.fullmatch(r, p)]
