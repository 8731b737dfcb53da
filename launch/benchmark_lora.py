"""LoRA fine-tuning throughput on SmolLM2-135M: strata's compiled train step against
Hugging Face PEFT on PyTorch, same shape, same data, in one process.

strata: `configs/decoder.py` with `method=lora` (the `gguf:smollm2` weights loaded as the
loop's `init_from` does, float32), the jitted step of `train/trainer.py: build_trainer`
(compiled before timing; frozen weights never differentiated, no optimizer state).
HF: `AutoModelForCausalLM.from_pretrained` on the same GGUF file (dequantized to float32
by transformers) wrapped by `peft.get_peft_model(LoraConfig(...))`, eager, torch on
`--torch_threads` threads (default: every core the process may use, as XLA does).
Both: rank `--rank`, alpha `--alpha`, no LoRA dropout, on the projections `--targets`
names (a regex over strata's names, HF_MODULES maps them onto HF's: query|value ->
q_proj, v_proj); causal-LM loss over every next token of a [batch, seq_len] batch (the
mean over batch * (seq_len - 1) tokens: HF's `labels=input_ids`); AdamW (lr `--lr`
constant, betas 0.9/0.999, eps 1e-8, weight decay 0.01 on every LoRA matrix) after
clipping the global gradient norm to 1.0. The batch is WordNet glosses tokenized by the
file's BPE (`benchmark_decode.gloss_prompts`): the same ids go to both.

Each side takes one untimed warm-up step (strata's compiles first); its loss is step 0's
on the same weights and batch (LoRA's B starts at zero: the base model's), so the two
should agree to float32 rounding: a check that the shapes really are the same. Rounds
then alternate the two, the order flipping every round (the machine is noisy), `--steps`
steps per measurement; one JSON line per measurement (wall s, process CPU s, tokens/s),
then a summary: median tokens/s each, strata/HF ratio (and per round), both trainable
parameter counts, both step-0 losses. torch, transformers and peft are the `benchmark`
extra (`pip install torch==2.13.0 'transformers>=5.23,<6' peft`).

    python -m launch.benchmark_lora
    python -m launch.benchmark_lora --batch 8 --seq_len 128 --targets 'query|key|value|out' \\
        --rounds 5 --torch_threads 2
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

import jax
import numpy as np

from launch.benchmark_decode import gloss_prompts, smollm2_path
from model.lora import TARGETS

# strata's projection names (model/lora.py TARGETS) -> HF Llama's module names.
HF_MODULES = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "o_proj",
              "gate": "gate_proj", "wi": "up_proj", "wo": "down_proj"}


def hf_target_modules(targets):
    """The HF Llama modules the strata regex `targets` selects, in TARGETS order."""
    names = [HF_MODULES[t] for t in TARGETS if re.fullmatch(targets, t)]
    if not names:
        raise ValueError(f"--targets {targets!r} matches none of {TARGETS}")
    return names


def lm_batch(tokens):
    """The prefix_lm task's batch for causal-LM loss over every next token of `tokens`
    int [batch, seq]: targets shifted left, weight 1 but at the last position (nothing
    follows it), no bidirectional prefix."""
    tokens = np.asarray(tokens, np.int32)
    rows, length = tokens.shape
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    weights = np.ones(tokens.shape, np.float32)
    weights[:, -1] = 0.0
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy(),
            "example_weight": np.ones(rows, np.float32),
            "prefix_mask": np.zeros(tokens.shape, bool), "targets": targets,
            "target_weights": weights}


def make_config(args):
    """configs/decoder.py's LoRA run at the benchmark's shape, constant lr from step 0."""
    from configs import decoder

    c = decoder.get_config(f"method=lora,lora_rank={args.rank},lora_alpha={args.alpha},"
                           f"lora_targets={args.targets},max_len={args.seq_len}")
    c.data.seq_len = args.seq_len
    c.data.batch_size = c.data.eval_batch_size = args.batch
    c.optim.update(dict(lr=args.lr, warmup_steps=0, schedule="constant"))
    return c


class StrataLoRA:
    """The loop's own step: build_trainer, init_from's weights, compiled ahead."""

    name = "strata"

    def __init__(self, config, tokens, load_weights=True):
        from train.init_from import init_params_from
        from train.trainer import build_trainer

        trainer = build_trainer(config)
        state = trainer.init_state()
        if load_weights:
            params, report = init_params_from(config.init_from, state.params)
            if report["shape_mismatch"] or not all("/lora_" in p
                                                   for p in report["initialised"]):
                raise RuntimeError(f"{config.init_from}: {report}")
            state = state.replace(params=params, opt_state=trainer.init_opt_state(params))
        self.state = state
        self.batch = trainer.global_batch(lm_batch(tokens))
        start = time.perf_counter()
        self.step = trainer.compile_train_step(self.state, self.batch)
        self.trainable = int(trainer.counts["trainable"])
        self.info = {"platform": jax.devices()[0].platform, "devices": jax.device_count(),
                     "compile_s": round(time.perf_counter() - start, 2),
                     "dtype": str(trainer.model.cfg.dtype)}

    def __call__(self, steps):
        """-> the steps' losses (each before its update)."""
        losses = []
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
            losses.append(metrics["loss"])
        return [float(x) for x in jax.block_until_ready(losses)]


class HFLoRA:
    """PEFT LoRA on transformers' Llama from the same GGUF file, AdamW, eager."""

    name = "hf"

    def __init__(self, args, tokens, model=None):
        # Before libgomp loads: spinning OpenMP threads starve each other (and XLA's) on a
        # shared machine (launch/benchmark_decode.py).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import peft
        import torch
        import transformers

        torch.set_num_threads(args.torch_threads)
        torch.manual_seed(0)
        if model is None:
            path = smollm2_path()
            model = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
                local_files_only=True)  # The packaged file; nothing downloads.
        self.model = peft.get_peft_model(model, peft.LoraConfig(
            r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
            target_modules=hf_target_modules(args.targets))).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.999),
                                           eps=1e-8, weight_decay=0.01)
        self.tokens = torch.from_numpy(np.asarray(tokens, np.int64))
        self.torch = torch
        self.info = {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "torch_threads": torch.get_num_threads(),
                     "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                     "dtype": str(next(self.model.parameters()).dtype),
                     "target_modules": hf_target_modules(args.targets)}

    def __call__(self, steps):
        losses = []
        for _ in range(steps):
            loss = self.model(input_ids=self.tokens, labels=self.tokens, use_cache=False).loss
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        return [float(x) for x in losses]


def timed(impl, steps):
    wall, cpu = time.perf_counter(), time.process_time()
    losses = impl(steps)
    return time.perf_counter() - wall, time.process_time() - cpu, losses


def race(impls, args):
    """A warm-up step of each, then `args.rounds` rounds alternating them; one JSON line
    per measurement; -> the summary dict (also printed). An impl is
    `impl(steps) -> [loss per step]` with a `name` and a `trainable` count."""
    tokens_per_step = args.batch * args.seq_len
    summary = {"summary": True, "batch": args.batch, "seq_len": args.seq_len,
               "rank": args.rank, "alpha": args.alpha, "targets": args.targets,
               "steps": args.steps, "rounds": args.rounds}
    for impl in impls:  # Untimed warm-up; its loss is step 0's, on the initial weights.
        wall, _, (loss,) = timed(impl, 1)
        summary[f"{impl.name}_step0_loss"] = round(loss, 5)
        print(json.dumps({"implementation": impl.name, "warmup_s": round(wall, 2),
                          "step0_loss": round(loss, 5)}), flush=True)
    walls = {impl.name: [] for impl in impls}
    for round_ in range(args.rounds):
        for impl in impls if round_ % 2 == 0 else impls[::-1]:
            wall, cpu, losses = timed(impl, args.steps)
            walls[impl.name].append(wall)
            print(json.dumps({
                "round": round_, "implementation": impl.name, "wall_s": round(wall, 4),
                "cpu_s": round(cpu, 4),
                "tokens_per_s": round(args.steps * tokens_per_step / wall, 1),
                "last_loss": round(losses[-1], 5)}), flush=True)
    for impl in impls:
        summary[f"{impl.name}_tokens_per_s"] = round(
            args.steps * tokens_per_step / statistics.median(walls[impl.name]), 1)
        summary[f"{impl.name}_trainable"] = impl.trainable
    if {impl.name for impl in impls} == {"strata", "hf"}:
        summary["strata_over_hf"] = round(
            summary["strata_tokens_per_s"] / summary["hf_tokens_per_s"], 3)
        # Rounds are back to back: their own ratios cancel the machine's slow spells.
        summary["strata_over_hf_per_round"] = [
            round(h / s, 3) for s, h in zip(walls["strata"], walls["hf"])]
        summary["trainable_agree"] = summary["strata_trainable"] == summary["hf_trainable"]
        summary["step0_loss_difference"] = round(
            abs(summary["strata_step0_loss"] - summary["hf_step0_loss"]), 6)
    print(json.dumps(summary), flush=True)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", default="query|value",
                        help=f"regex over {'|'.join(TARGETS)} (strata's names)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per measurement.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch_threads", type=int, default=(
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()))
    parser.add_argument("--no_hf", action="store_true", help="strata alone")
    args = parser.parse_args(argv)
    hf_target_modules(args.targets)  # An unknown target fails before anything loads.

    from train.data.tokenizer import GGUFBPETokenizer

    tokens = gloss_prompts(GGUFBPETokenizer(smollm2_path()), args.batch, args.seq_len)
    strata = StrataLoRA(make_config(args), tokens)
    print(json.dumps({"implementation": "strata", **strata.info}), flush=True)
    impls = [strata]
    if not args.no_hf:
        try:
            hf = HFLoRA(args, tokens)
        except ImportError as e:
            print(json.dumps({"implementation": "hf", "error": f"{e}: pip install "
                              "torch==2.13.0 'transformers>=5.23,<6' peft (the benchmark "
                              "extra)"}), flush=True)
        else:
            print(json.dumps({"implementation": "hf", **hf.info}), flush=True)
            impls.append(hf)
    race(impls, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
