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

Scale-out (without `--compare_torch`): one measurement per size x mesh shape (and per
point of the scaling sweep), each a fresh compile, each printed as a JSON line with
tokens/s, step time, MFU, compile time, `compiled_step_bytes` (XLA's per-device figure
for the compiled step, `train/memory.py`), the device allocator's peak where the backend
has one and the parameters' bytes (total and per device); a table follows at the end.
XLA's CPU backend reports no temporaries, so on CPU `compiled_step_bytes` is arguments +
outputs - donated buffers (state and batch, no activations) and `host_peak_rss_bytes`
(the process's peak so far) is the whole-process figure.
`--fake_devices 8` runs on 8 host-platform CPU devices (XLA_FLAGS set before JAX starts
its backend): it shows sharding overheads and per-device memory, not accelerator speed;
the fake devices share the host's cores, so MFU counts the host's peak once. `--scaling`
times batch sizes at a fixed sequence length and sequence lengths at a fixed batch, with
each point's time / work relative to the sweep's first point (1.0: cost grows as the
tokens do; the attention term grows with seq, so the seq sweep's FLOP ratio is printed
too). A mesh or shape the model cannot be sharded over is reported as an error line.

Reproduce (torch is optional: `pip install -e .[benchmark]` and `pip install torch==2.13.0`):

    python -m launch.benchmark --size small --compare_torch --rounds 5
    python -m launch.benchmark --size base --compare_torch --rounds 5
    python -m launch.benchmark --size small --steps 20        # strata only
    python -m launch.benchmark --size small base --fake_devices 8 --mesh sweep --steps 3
    python -m launch.benchmark --size small --scaling --steps 3
"""

import argparse
import json
import os
import re
import resource
import statistics
import sys
import time

import jax
import numpy as np

from configs.common import base_config, model_config
from model.attention import ATTENTION_IMPLS
from train import flops, memory, partitioning
from train.trainer import build_trainer

SHAPES = {
    "tiny": dict(vocab_size=1000, seq_len=64, batch_size=16, steps=3),  # Smoke runs, tests.
    "small": dict(vocab_size=8192, seq_len=128, batch_size=32, steps=10),
    "base": dict(vocab_size=30522, seq_len=128, batch_size=8, steps=4),
}
MASK_RATE = 0.15  # BERT: 15% of positions are predicted.
MASK_ID = 4  # Any non-special id; the masked tokens' identity does not change the cost.
# --mesh sweep: each parallelism alone over every device, then all three at 2.
MESH_SWEEP = ("data=-1", "fsdp=-1", "tensor=-1", "data=2,fsdp=2,tensor=2")
SCALING_BATCHES = (4, 8, 16, 32)  # At SCALING_SEQ.
SCALING_SEQ = 128
SCALING_SEQS = (64, 128, 256, 512)  # At --scaling_batch.


def make_config(size, *, batch_size=None, seq_len=None, mesh=None, attention_impl="xla",
                dtype="float32"):
    """The benchmark's MLM config for `size`; `mesh` a dict of axis sizes (unnamed: 1)."""
    shape = SHAPES[size]
    c = base_config()
    c.task = "mlm"
    # The flash kernels cannot drop attention probabilities (model/attention.py).
    attention_dropout = 0.0 if attention_impl in ("cudnn", "splash") else 0.1
    c.model = model_config(size, vocab_size=shape["vocab_size"], heads=("mlm",),
                           type_vocab_size=2, dropout=0.1, attention_dropout=attention_dropout,
                           attention_impl=attention_impl, dtype=dtype, param_dtype="float32")
    c.data.seq_len = seq_len or shape["seq_len"]
    c.data.vocab_size = shape["vocab_size"]
    c.data.batch_size = batch_size or shape["batch_size"]
    c.data.mlm_max_predictions = max(1, round(MASK_RATE * c.data.seq_len))
    if mesh is not None:
        c.mesh.update({axis: int(mesh.get(axis, 1)) for axis in partitioning.MESH_AXES})
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    return c


def make_batch(config, seed):
    """A numpy MLM batch: random tokens, 15% of positions (sorted) masked per row."""
    rng = np.random.default_rng(seed)
    batch, seq = config.data.batch_size, config.data.seq_len
    vocab = config.model.vocab_size
    num_predict = config.data.mlm_max_predictions
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


class DoesNotFit(ValueError):
    """The compiled step needs more host memory than there is (fake CPU devices all live
    in this process); `details` holds what was measured before giving up."""

    def __init__(self, message, details):
        super().__init__(message)
        self.details = details


def available_host_bytes():
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


class StrataBench:
    impl = "strata"

    def __init__(self, config, batches):
        # The loop's own builder: the step, its shardings and MFU are the run's.
        self.trainer = build_trainer(config)
        self.mesh, self.model_cfg = self.trainer.mesh, self.trainer.model.cfg
        # Compiled from shapes first (as train/aot.py): its memory is known before any
        # weights exist, so a step that cannot fit is reported, not OOM-killed.
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                                  sharding=self.trainer.batch_sharding)
                          for k, v in batches[0].items()}
        start = time.perf_counter()
        self.step = self.trainer.compile_train_step(self.trainer.abstract_state(),
                                                    abstract_batch)
        self.compile_time_s = time.perf_counter() - start
        self.check_fits()
        self.state = self.trainer.init_state()
        self.batches = [jax.device_put(b, self.trainer.batch_sharding) for b in batches]
        self.index = 0

    def check_fits(self):
        """On CPU every device's share is host memory: all of them must fit at once."""
        per_device = memory.compiled_step_bytes(self.step)
        if jax.devices()[0].platform != "cpu" or per_device is None:
            return
        needed, available = per_device * jax.local_device_count(), available_host_bytes()
        if needed > 0.5 * available:  # Half: init, the compiler and other work need room.
            raise DoesNotFit(
                f"not run: the compiled step needs {needed / 2**30:.1f} GiB of host memory "
                f"({jax.local_device_count()} CPU devices x {per_device / 2**30:.2f} GiB), "
                f"{available / 2**30:.1f} GiB available",
                {"compiled_step_bytes": per_device,
                 "compile_time_s": round(self.compile_time_s, 3),
                 "mesh": dict(self.mesh.shape)})

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


def parse_mesh(spec):
    """"data=2,fsdp=2,tensor=2" -> {"data": 2, "fsdp": 2, "tensor": 2}; unnamed axes 1."""
    mesh = {}
    for item in filter(None, spec.split(",")):
        axis, _, size = item.partition("=")
        if axis not in partitioning.MESH_AXES or not size.lstrip("-").isdigit():
            raise ValueError(f"--mesh {spec!r}: expected axis=size items over "
                             f"{partitioning.MESH_AXES}, e.g. data=2,fsdp=2,tensor=2")
        mesh[axis] = int(size)
    return mesh


def use_fake_devices(count):
    """`count` CPU devices in this process; only possible before JAX starts a backend."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(
        [*flags, f"--xla_force_host_platform_device_count={count}"])
    jax.config.update("jax_platforms", "cpu")
    if jax.device_count() != count:
        raise RuntimeError(f"--fake_devices {count}: JAX had already started with "
                           f"{jax.device_count()} devices; pass it on a fresh process")


def platform_note():
    if jax.devices()[0].platform != "cpu":
        return ""
    return (f"CPU figures: {jax.device_count()} host-platform device(s) sharing "
            f"{os.cpu_count()} cores; not accelerator numbers")


def measure(config, *, steps, warmup=1, rounds=1):
    """Compile and time the train step under `config` (its shape and mesh): one dict.

    Step time is the median over `rounds` of `steps` back-to-back steps after `warmup`
    untimed ones. Memory: `compiled_step_bytes` (per device, from XLA), the device
    allocator's peak (None on CPU), this process's peak RSS so far, and the train
    state's parameters in bytes (total, and on one device after sharding).
    """
    batches = [make_batch(config, seed) for seed in (0, 1)]
    bench = StrataBench(config, batches)
    bench.run(warmup)
    times, cpu_times = [], []
    for _ in range(rounds):
        cpu_start = time.process_time()
        times.append(bench.run(steps) / steps)
        cpu_times.append((time.process_time() - cpu_start) / steps)
    step_time = statistics.median(times)
    batch, seq = config.data.batch_size, config.data.seq_len
    tokens_per_s = batch * seq / step_time
    flops_per_token = bench.trainer.flops_per_token
    params = jax.tree_util.tree_leaves(bench.state.params)
    return {
        "tokens_per_s": round(tokens_per_s, 1), "step_time_s": round(step_time, 4),
        "cpu_s_per_step": round(statistics.median(cpu_times), 4),
        "mfu": round(bench.trainer.mfu(tokens_per_s), 4),
        "flops_per_step": flops_per_token * batch * seq,
        "compiled_step_bytes": memory.compiled_step_bytes(bench.step),
        "device_peak_bytes": memory.device_peak_bytes(),
        "host_peak_rss_bytes": memory.host_peak_rss_bytes(),
        "params_bytes": int(sum(x.nbytes for x in params)),
        "params_bytes_per_device": int(sum(x.addressable_shards[0].data.nbytes
                                           for x in params)),
        "batch_size": batch, "seq_len": seq, "steps": steps, "rounds": rounds,
        "attention_impl": config.model.attention_impl, "dtype": config.model.dtype,
        **bench.info(),
    }


def run_measurement(args, size, mesh_spec, *, sweep=None, batch_size=None, seq_len=None):
    """measure() for one point, as a printed JSON line; a config the mesh cannot take
    (indivisible batch, heads or vocabulary) is reported, not fatal."""
    row = {"size": size, "mesh_spec": mesh_spec or "default", "sweep": sweep}
    try:
        config = make_config(size, batch_size=batch_size, seq_len=seq_len,
                             mesh=parse_mesh(mesh_spec) if mesh_spec else None,
                             attention_impl=args.attention_impl, dtype=args.dtype)
        row.update(measure(config, steps=args.steps or SHAPES[size]["steps"],
                           warmup=args.warmup, rounds=args.rounds))
    except ValueError as e:  # Mesh / divisibility / config errors name what is wrong.
        row.update(batch_size=batch_size, seq_len=seq_len, error=short_error(e),
                   **getattr(e, "details", {}))
    if platform_note():
        row["note"] = platform_note()
    print(json.dumps(row), flush=True)
    return row


def short_error(error):
    """First line of an error; XLA's indivisible-sharding message in a few words."""
    text = str(error).splitlines()[0]
    found = re.search(r"partitioned (\d+) times, but the dimension size is (\d+) "
                      r"\(full shape: (\([^)]*\))", text)
    if found:
        ways, size, shape = found.groups()
        return (f"cannot shard: an axis of size {size} (array {shape}) does not split "
                f"{ways} ways; {text}")
    return text


def add_ratios(rows):
    """Each sweep point's step time and work relative to the first: time/work 1.0 means
    cost grows as the tokens do, > 1 faster than them."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    first = ok[0]
    for r in ok:
        time_ratio = r["step_time_s"] / first["step_time_s"]
        work_ratio = r["batch_size"] * r["seq_len"] / (first["batch_size"] * first["seq_len"])
        r.update(time_ratio=round(time_ratio, 3), tokens_ratio=round(work_ratio, 3),
                 flops_ratio=round(r["flops_per_step"] / first["flops_per_step"], 3),
                 time_per_work=round(time_ratio / work_ratio, 3))
        print(json.dumps({"ratio": True, **{k: r[k] for k in (
            "size", "mesh_spec", "sweep", "batch_size", "seq_len", "step_time_s",
            "time_ratio", "tokens_ratio", "flops_ratio", "time_per_work")}}), flush=True)


def mib(value):
    return "-" if value is None else f"{value / 2**20:.1f}"


def print_table(rows):
    """The measurements as a readable table (after the JSON lines)."""
    columns = ("size", "mesh", "sweep", "batch", "seq", "tokens/s", "step ms", "MFU",
               "compile s", "step MiB/dev", "params MiB/dev", "dev peak MiB", "time/work")
    lines = []
    for r in rows:
        mesh = ("x".join(f"{a[0]}{n}" for a, n in r["mesh"].items()) if "mesh" in r
                else r["mesh_spec"])
        if "error" in r:
            lines.append((r["size"], mesh, r["sweep"] or "", str(r["batch_size"] or ""),
                          str(r["seq_len"] or ""), "error: " + r["error"][:90]))
            continue
        lines.append((r["size"], mesh, r["sweep"] or "", str(r["batch_size"]),
                      str(r["seq_len"]), f"{r['tokens_per_s']:.0f}",
                      f"{1000 * r['step_time_s']:.1f}", f"{r['mfu']:.3f}",
                      f"{r['compile_time_s']:.1f}", mib(r["compiled_step_bytes"]),
                      mib(r["params_bytes_per_device"]), mib(r["device_peak_bytes"]),
                      str(r.get("time_per_work", ""))))
    # An error row's last cell runs on past the columns; it sets no width.
    widths = [max([len(c)] + [len(line[i]) for line in lines if i < len(line) - 1
                              or len(line) == len(columns)])
              for i, c in enumerate(columns)]
    print()
    if platform_note():
        print(platform_note() + f"; host peak RSS {mib(memory.host_peak_rss_bytes())} MiB")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for line in lines:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())


def compare_torch(args, size):
    """Strata vs HF BertForMaskedLM, rounds alternating (the original benchmark)."""
    config = make_config(size)
    steps = args.steps or SHAPES[size]["steps"]
    batches = [make_batch(config, seed) for seed in (0, 1)]
    tokens_per_step = config.data.batch_size * config.data.seq_len

    benches = [StrataBench(config, batches), TorchBench(config, batches, args.torch_threads)]
    flops_per_token = benches[0].trainer.flops_per_token  # Same work for both.
    peak = flops.peak_flops()
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
            memory_bytes, memory_source = peak_memory()
            print(json.dumps({
                "impl": bench.impl, "size": size, "round": r,
                "tokens_per_s": round(tokens_per_s, 1), "step_time_s": round(step_time, 4),
                "cpu_s_per_step": round(cpu_per_step, 4),
                "mfu": round(tokens_per_s * flops_per_token / peak, 4),
                "peak_memory_bytes": memory_bytes, "peak_memory_source": memory_source,
                "steps": steps, "batch_size": config.data.batch_size,
                "seq_len": config.data.seq_len, "devices": jax.device_count(),
                "mesh": dict(benches[0].mesh.shape), **bench.info(),
            }), flush=True)

    ratios = [s / t for s, t in zip(results["strata"], results["torch"])]
    print(json.dumps({
        "summary": True, "size": size, "rounds": args.rounds, "steps": steps,
        "strata_tokens_per_s_median": round(statistics.median(results["strata"]), 1),
        "torch_tokens_per_s_median": round(statistics.median(results["torch"]), 1),
        "ratio_strata_over_torch_median": round(statistics.median(ratios), 3),
        "ratios": [round(x, 3) for x in ratios],
        "peak_flops": peak, "flops_per_token": flops_per_token,
    }), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SHAPES), nargs="+", default=["small"])
    parser.add_argument("--steps", type=int, default=None,
                        help="Timed steps per measurement (default: 10 small, 4 base).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps per impl.")
    parser.add_argument("--rounds", type=int, default=None,
                        help="Timed rounds (default: 3 with --compare_torch, else 1).")
    parser.add_argument("--compare_torch", action="store_true")
    parser.add_argument("--torch_threads", type=int, default=2)
    parser.add_argument("--mesh", nargs="+", default=None,
                        help="Mesh shapes, e.g. data=8 fsdp=8 data=2,fsdp=2,tensor=2 "
                             "(unnamed axes 1; one may be -1); 'sweep' = " + " ".join(MESH_SWEEP))
    parser.add_argument("--fake_devices", type=int, default=0,
                        help="Run on this many host-platform CPU devices.")
    parser.add_argument("--scaling", nargs="?", const="both", choices=("batch", "seq", "both"),
                        help=f"Also sweep batch {SCALING_BATCHES} at seq {SCALING_SEQ} and/or "
                             f"seq {SCALING_SEQS} at --scaling_batch (bare: both).")
    parser.add_argument("--scaling_batch", type=int, default=8)
    parser.add_argument("--attention_impl", default="xla", choices=ATTENTION_IMPLS,
                        help="config.model.attention_impl (cudnn/splash: attention dropout 0).")
    parser.add_argument("--dtype", default="float32", help="config.model.dtype.")
    args = parser.parse_args(argv)

    if args.fake_devices:
        use_fake_devices(args.fake_devices)
    # The same PRNG the configs default to (launch/main.py applies it the same way).
    if base_config().prng_impl:
        jax.config.update("jax_default_prng_impl", base_config().prng_impl)
    if args.compare_torch:
        args.rounds = args.rounds or 3
        for size in args.size:
            compare_torch(args, size)
        return
    args.rounds = args.rounds or 1
    meshes = args.mesh or [None]
    if meshes == ["sweep"]:
        meshes = list(MESH_SWEEP)
    rows = []
    for size in args.size:
        for mesh in meshes if args.mesh or not args.scaling else []:  # --scaling alone: sweeps.
            rows.append(run_measurement(args, size, mesh))
        if args.scaling:
            mesh = meshes[0]
            for sweep, points in (("batch", [(b, SCALING_SEQ) for b in SCALING_BATCHES]),
                                  ("seq", [(args.scaling_batch, s) for s in SCALING_SEQS])):
                if args.scaling not in (sweep, "both"):
                    continue
                sweep_rows = [run_measurement(args, size, mesh, sweep=sweep, batch_size=b,
                                              seq_len=s) for b, s in points]
                add_ratios(sweep_rows)
                rows.extend(sweep_rows)
    print_table(rows)


if __name__ == "__main__":
    main()
