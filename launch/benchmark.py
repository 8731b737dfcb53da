"""Train-step throughput of strata's MLM step, optionally side by side with PyTorch.

Times the real compiled train step (`train.steps.make_train_step`, jitted over the
mesh with state shardings and donation exactly as `train/loop.py` does) on a BERT MLM
batch: 15% of positions masked (`objectives.MaskedLM`), AdamW from `make_optimizer`
(clip 1.0, weight decay 0.01), dropout 0.1, float32. Prints one JSON line per
measurement to stdout; with `--compare_torch` the rounds alternate strata / HF
`BertForMaskedLM` (eager, 2 threads, same shape, AdamW, same clipping) in the same
process (the order flips every round: the machine is noisy) and a final summary line
gives the median strata/torch tokens/s ratio.

Shapes: small = 4 layers, hidden 256, 4 heads, MLP 1024, vocab 8192, seq 128, batch 32;
base = BERT-base (12 x 768, 12 heads, MLP 3072, vocab 30522), seq 128, batch 8.

MFU counts the useful matmul FLOPs (`flops.train_flops_per_token`, MLM head at the
masked fraction) for both implementations against `flops.measured_peak_flops()`, so
the MFU ratio equals the throughput ratio. Peak memory is the device's
`peak_bytes_in_use` where it reports one, else the process's max RSS (which, with
`--compare_torch`, covers both implementations). `cpu_s_per_step` is the process's CPU
time per step: on a shared, contended machine it is steadier than wall time.

Reproduce (torch is optional: `pip install -e .[benchmark]` and `pip install torch==2.13.0`):

    python -m launch.benchmark --size small --compare_torch --rounds 5
    python -m launch.benchmark --size base --compare_torch --rounds 5
    python -m launch.benchmark --size small --steps 20        # strata only
"""

import argparse
import json
import resource
import statistics
import sys
import time

import jax
import numpy as np
from flax import linen as nn

from configs.common import base_config, model_config
from train import flops, model_setup, objectives, partitioning
from train.optimizer import make_optimizer
from train.steps import make_train_step

SHAPES = {
    "small": dict(vocab_size=8192, seq_len=128, batch_size=32, steps=10),
    "base": dict(vocab_size=30522, seq_len=128, batch_size=8, steps=4),
}
MASK_RATE = 0.15  # BERT: 15% of positions are predicted.
MASK_ID = 4  # Any non-special id; the masked tokens' identity does not change the cost.


def make_config(size):
    shape = SHAPES[size]
    c = base_config()
    c.task = "mlm"
    c.model = model_config(size, vocab_size=shape["vocab_size"], heads=("mlm",),
                           type_vocab_size=2, dropout=0.1, attention_dropout=0.1,
                           dtype="float32", param_dtype="float32")
    c.data.seq_len = shape["seq_len"]
    c.data.vocab_size = shape["vocab_size"]
    c.data.batch_size = shape["batch_size"]
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    return c


def make_batch(config, seed):
    """A numpy MLM batch: random tokens, 15% of positions (sorted) masked per row."""
    rng = np.random.default_rng(seed)
    batch, seq = config.data.batch_size, config.data.seq_len
    vocab = config.model.vocab_size
    num_predict = max(1, round(MASK_RATE * seq))
    targets = rng.integers(5, vocab, (batch, seq), dtype=np.int32)
    positions = np.sort(np.stack(
        [rng.choice(seq, num_predict, replace=False) for _ in range(batch)]), axis=1)
    positions = positions.astype(np.int32)
    tokens = targets.copy()
    np.put_along_axis(tokens, positions, MASK_ID, axis=1)
    return {
        "tokens": tokens,
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "mlm_positions": positions,
        "mlm_targets": np.take_along_axis(targets, positions, axis=1),
        "mlm_weights": np.ones((batch, num_predict), np.float32),
        "example_weight": np.ones((batch,), np.float32),
    }


def peak_memory():
    """(bytes, source): device peak where reported, else the process's max RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss * (1 if sys.platform == "darwin" else 1024)), "process_maxrss"


class StrataBench:
    impl = "strata"

    def __init__(self, config, batches):
        rules = tuple(tuple(r) for r in config.logical_axis_rules)
        self.mesh = partitioning.make_mesh(config.mesh)
        partitioning.check_batch_divides(config.data.batch_size, self.mesh)
        batch_sharding = partitioning.batch_sharding(self.mesh)
        replicated = partitioning.replicated(self.mesh)
        model = model_setup.build_model(config)
        self.model_cfg = model.cfg
        tx, _ = make_optimizer(config.optim, config.train.num_steps)
        boxed, _ = model_setup.abstract_train_state(model, tx, config.data.seq_len)
        shardings = model_setup.state_shardings(boxed, self.mesh, rules)
        self.state = model_setup.init_train_state(model, tx, config.data.seq_len,
                                                  config.seed, shardings)
        self.batches = [jax.device_put(b, batch_sharding) for b in batches]
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(rules):
            step = jax.jit(
                make_train_step(model, tx, objectives.MaskedLM(), seed=config.seed),
                in_shardings=(shardings, batch_sharding),
                out_shardings=(shardings, replicated), donate_argnums=(0,))
            start = time.perf_counter()
            self.step = step.lower(self.state, self.batches[0]).compile()
            self.compile_time_s = time.perf_counter() - start
        self.index = 0

    def run(self, steps):
        """Seconds for `steps` train steps (dispatched back to back, synced once)."""
        metrics = None
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batches[self.index % 2])
            self.index += 1
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start

    def info(self):
        return {"compile_time_s": round(self.compile_time_s, 3),
                "devices": jax.device_count(), "platform": jax.devices()[0].platform,
                "mesh": dict(self.mesh.shape),
                "prng_impl": str(jax.config.jax_default_prng_impl)}


class TorchBench:
    impl = "torch"

    def __init__(self, config, batches, threads=2):
        import torch
        import transformers

        torch.set_num_threads(threads)
        torch.manual_seed(config.seed)
        m = config.model
        bert_cfg = transformers.BertConfig(
            vocab_size=m.vocab_size, hidden_size=m.hidden, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
            max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
            layer_norm_eps=m.layer_norm_eps)
        self.torch = torch
        self.model = transformers.BertForMaskedLM(bert_cfg).train()
        decay = [p for n, p in self.model.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim <= 1]
        o = config.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
        self.clip_norm = o.clip_norm
        self.batches = []
        for b in batches:
            labels = np.full(b["tokens"].shape, -100, np.int64)
            np.put_along_axis(labels, b["mlm_positions"], b["mlm_targets"], axis=1)
            self.batches.append({
                "input_ids": torch.from_numpy(b["tokens"].astype(np.int64)),
                "attention_mask": torch.from_numpy((b["segment_ids"] != 0).astype(np.int64)),
                "token_type_ids": torch.zeros(b["tokens"].shape, dtype=torch.int64),
                "labels": torch.from_numpy(labels),
            })
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None)
        self.versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        self.threads = threads
        self.index = 0

    def run(self, steps):
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.model(**self.batches[self.index % 2]).loss
            loss.backward()
            if self.clip_norm > 0:
                self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.index += 1
        loss.item()
        return time.perf_counter() - start

    def info(self):
        return {"threads": self.threads, "attn_implementation": self.attn_implementation,
                **self.versions}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=None,
                        help="Timed steps per measurement (default: 10 small, 4 base).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps per impl.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare_torch", action="store_true")
    parser.add_argument("--torch_threads", type=int, default=2)
    args = parser.parse_args(argv)

    config = make_config(args.size)
    # The same PRNG the configs default to (launch/main.py applies it the same way).
    if config.prng_impl:
        jax.config.update("jax_default_prng_impl", config.prng_impl)
    steps = args.steps or SHAPES[args.size]["steps"]
    batches = [make_batch(config, seed) for seed in (0, 1)]
    tokens_per_step = config.data.batch_size * config.data.seq_len

    benches = [StrataBench(config, batches)]
    if args.compare_torch:
        benches.append(TorchBench(config, batches, args.torch_threads))
    fraction = batches[0]["mlm_positions"].shape[1] / config.data.seq_len
    flops_per_token = flops.train_flops_per_token(benches[0].model_cfg, config.data.seq_len,
                                                  fraction)
    peak_flops = flops.measured_peak_flops() * jax.device_count()
    for bench in benches:
        bench.run(args.warmup)

    results = {b.impl: [] for b in benches}
    for r in range(args.rounds):
        order = benches if r % 2 == 0 else benches[::-1]
        for bench in order:
            cpu_start = time.process_time()
            seconds = bench.run(steps)
            cpu_per_step = (time.process_time() - cpu_start) / steps
            step_time = seconds / steps
            tokens_per_s = tokens_per_step / step_time
            results[bench.impl].append(tokens_per_s)
            memory, memory_source = peak_memory()
            print(json.dumps({
                "impl": bench.impl, "size": args.size, "round": r,
                "tokens_per_s": round(tokens_per_s, 1), "step_time_s": round(step_time, 4),
                "cpu_s_per_step": round(cpu_per_step, 4),
                "mfu": round(tokens_per_s * flops_per_token / peak_flops, 4),
                "peak_memory_bytes": memory, "peak_memory_source": memory_source,
                "steps": steps, "batch_size": config.data.batch_size,
                "seq_len": config.data.seq_len, "devices": jax.device_count(),
                "mesh": dict(benches[0].mesh.shape), **bench.info(),
            }), flush=True)

    if args.compare_torch:
        ratios = [s / t for s, t in zip(results["strata"], results["torch"])]
        print(json.dumps({
            "summary": True, "size": args.size, "rounds": args.rounds, "steps": steps,
            "strata_tokens_per_s_median": round(statistics.median(results["strata"]), 1),
            "torch_tokens_per_s_median": round(statistics.median(results["torch"]), 1),
            "ratio_strata_over_torch_median": round(statistics.median(ratios), 3),
            "ratios": [round(x, 3) for x in ratios],
            "peak_flops": peak_flops, "flops_per_token": flops_per_token,
        }), flush=True)


if __name__ == "__main__":
    main()
