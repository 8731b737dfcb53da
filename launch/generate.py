r"""Generates text with any decoder checkpoint: a GGUF file or a strata workdir (with its
PEFT parameters), through the compiled KV-cache decoding loop (model/decoding.py).

  python -m launch.generate --init_from gguf:smollm2 --chat \
      --prompt "What is a poodle a kind of?" --prompt "Name a kind of fish."
  python -m launch.generate --init_from runs/decoder_lora --prompt "..." --json
  python -m launch.generate --init_from gguf:path/to/model.gguf --strategy sample \
      --temperature 0.7 --top_p 0.9 --max_new_tokens 64

Several `--prompt`s decode together as one batch. `--chat` wraps each prompt in the
tokenizer's chat template (ChatML for SmolLM2) and stops at the end-of-turn token.
`--json` prints one JSON object per prompt: the prompt, the generated token ids, each
token's log-probability under the model, and the text.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def load_decoder(spec, max_len=None):
    """`gguf:<alias|path>` or a strata workdir -> (model, params, tokenizer)."""
    from model.transformer import Model, resolve
    from train.data import tokenizer as tokenizers
    from train.embedding import unflatten
    from train.init_from import load_params

    if spec.startswith("gguf:"):
        from configs.common import model_config
        from model import gguf_llama

        flat, fields, _ = gguf_llama.load(spec)
        fields["max_len"] = min(fields["max_len"], max_len or fields["max_len"])
        cfg = model_config("small", **fields, heads=("lm",), dropout=0.0,
                           attention_dropout=0.0)
        data = ml_collections.ConfigDict({"tokenizer": "gguf", "tokenizer_path": spec})
    else:
        path = os.path.join(spec, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--init_from={spec!r} is neither gguf:<alias|path> "
                                    f"nor a strata workdir (no config.json)")
        with open(path) as f:
            config = ml_collections.ConfigDict(json.load(f))
        if "lm" not in config.model.heads:
            raise ValueError(f"--init_from={spec!r}: config.model.heads="
                             f"{tuple(config.model.heads)} has no 'lm' head to generate with")
        flat, _ = load_params(spec)
        cfg, data = config.model, config.data
    model = Model(resolve(cfg))
    params = jax.tree.map(jnp.asarray, unflatten(flat))
    return model, params, tokenizers.get_tokenizer(data)


def generate(model, params, tok, prompts, *, chat=False, strategy="greedy",
             max_new_tokens=32, temperature=1.0, top_k=0, top_p=1.0, beam_size=4, seed=0):
    """-> [{"prompt", "token_ids", "log_probs", "text"}] per prompt."""
    from model import decoding

    texts = [tok.apply_chat_template([{"role": "user", "content": p}]) if chat else p
             for p in prompts]
    encoded = [list(tok.encode(t)) for t in texts]
    for prompt, ids in zip(prompts, encoded):
        if len(ids) + max_new_tokens > model.cfg.max_len:
            raise ValueError(
                f"The prompt {prompt[:40]!r}... is {len(ids)} tokens; with "
                f"--max_new_tokens={max_new_tokens} it exceeds the model's context of "
                f"{model.cfg.max_len} tokens")
    lengths = np.array([len(ids) for ids in encoded], np.int32)
    batch = np.full((len(encoded), lengths.max()), tok.pad_id, np.int32)
    for i, ids in enumerate(encoded):
        batch[i, :len(ids)] = ids
    eos = tok.eos_id  # SmolLM2: <|im_end|>, the end of a chat turn and of a text.
    config = decoding.DecodeConfig(strategy=strategy, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   beam_size=beam_size, eos_id=eos, pad_id=tok.pad_id)
    tokens, _ = decoding.generate(model, params, jnp.asarray(batch), jnp.asarray(lengths),
                                  config, rng=jax.random.key(seed))
    outputs = []
    generated = []
    for row in np.asarray(tokens):
        ids = [int(t) for t in row]
        if eos in ids:
            ids = ids[:ids.index(eos) + 1]
        generated.append(ids)
    scores = decoding.token_log_probs(
        model, params, [list(p) + g for p, g in zip(encoded, generated)])
    for prompt, ids, prompt_ids, score in zip(prompts, generated, encoded, scores):
        text_ids = [t for t in ids if t != eos]
        outputs.append({"prompt": prompt, "token_ids": ids,
                        "log_probs": [float(x) for x in score[len(prompt_ids) - 1:]],
                        "text": tok.decode(text_ids)})
    return outputs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init_from", required=True,
                        help="gguf:smollm2, gguf:<path> or a strata workdir")
    parser.add_argument("--prompt", action="append", required=True,
                        help="Prompt text (repeat to batch several)")
    parser.add_argument("--chat", action="store_true", help="Apply the chat template")
    parser.add_argument("--strategy", choices=("greedy", "sample", "beam"), default="greedy")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--beam_size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_len", type=int, default=2048,
                        help="Context (KV cache) length for a GGUF file")
    parser.add_argument("--json", action="store_true", help="One JSON object per prompt")
    args = parser.parse_args(argv)
    try:
        model, params, tok = load_decoder(args.init_from, args.max_len)
        outputs = generate(model, params, tok, args.prompt, chat=args.chat,
                           strategy=args.strategy, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, beam_size=args.beam_size, seed=args.seed)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"FATAL: {error}")
    for out in outputs:
        print(json.dumps(out) if args.json else f"> {out['prompt']}\n{out['text']}\n")


if __name__ == "__main__":
    main()
