"""Decoding throughput: the KV-cache loop (`model.decoding.generate`) against full
recompute (`generate_without_cache`: every step re-runs the whole forward over the
[batch, prompt + new] buffer). Both are one jitted `while_loop`, compiled before timing;
greedy, no EOS, so every row generates exactly `--new_tokens` tokens.

Default shape: the SMALL model (4 layers, hidden 256, 4 heads, MLP 1024, vocab 8192,
max_len 512: the cache's length), causal, float32, random init; batch 8, 32-token
prompts, 64 new tokens. Rounds alternate the two decoders (the order flips every round:
the machine is noisy); one JSON line per measurement, then a summary with the median
tokens/s of each and the speedup. `cpu_s` is the process's CPU time: on a shared machine
it is steadier than wall time.

    python -m launch.benchmark_decode
    python -m launch.benchmark_decode --batch 32 --prompt_len 64 --new_tokens 128 --rounds 5
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from configs.common import model_config
from model import decoding
from model.transformer import Model, resolve


def time_decoder(fn, model, params, prompts, lengths, config):
    """(wall seconds, process CPU seconds) of one call, outputs on the host."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens, _ = fn(model, params, prompts, lengths, config)
    jax.block_until_ready(tokens)
    return time.perf_counter() - wall, time.process_time() - cpu, tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    cfg = resolve(model_config(args.size, vocab_size=args.vocab_size, max_len=args.max_len,
                               heads=("lm",), attention_mask="causal", dtype="float32",
                               param_dtype="float32"))
    model = Model(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    prompts = jax.random.randint(jax.random.key(1), (args.batch, args.prompt_len), 5,
                                 args.vocab_size)
    lengths = jnp.full((args.batch,), args.prompt_len)
    config = decoding.DecodeConfig(max_new_tokens=args.new_tokens, eos_id=None)
    decoders = {"cached": decoding.generate, "full_recompute": decoding.generate_without_cache}
    new_tokens = args.batch * args.new_tokens

    outputs = {}
    for name, fn in decoders.items():
        start = time.perf_counter()
        outputs[name] = jax.block_until_ready(fn(model, params, prompts, lengths, config)[0])
        print(json.dumps({"decoder": name, "compile_and_first_run_s":
                          round(time.perf_counter() - start, 2)}), flush=True)
    # Same tokens, or the comparison means nothing.
    agree = float(jnp.mean(outputs["cached"] == outputs["full_recompute"]))

    rates = {name: [] for name in decoders}
    for round_ in range(args.rounds):
        order = list(decoders) if round_ % 2 == 0 else list(decoders)[::-1]
        for name in order:
            wall, cpu, _ = time_decoder(decoders[name], model, params, prompts, lengths,
                                        config)
            rates[name].append(new_tokens / wall)
            print(json.dumps({"round": round_, "decoder": name, "wall_s": round(wall, 4),
                              "cpu_s": round(cpu, 4),
                              "tokens_per_s": round(new_tokens / wall, 1)}), flush=True)

    cached = statistics.median(rates["cached"])
    full = statistics.median(rates["full_recompute"])
    print(json.dumps({
        "summary": True, "device": str(jax.devices()[0].platform),
        "size": args.size, "batch": args.batch, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "max_len": args.max_len,
        "cached_tokens_per_s": round(cached, 1), "full_recompute_tokens_per_s": round(full, 1),
        "speedup": round(cached / full, 2), "same_tokens_fraction": agree,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
