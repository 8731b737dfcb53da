"""Fine-tuning step throughput per method, strata side by side with HF PEFT on PyTorch.

Sequence classification (45 classes) on the BERT-base shape, seq 64, batch 16, float32,
dropout 0.1, AdamW + clipping. strata runs the real compiled step of `train/steps.py`
with the method's `optim.param_rules` from `configs/finetune.py` (frozen parameters are
never differentiated and hold no optimizer state); PyTorch runs `BertForSequenceClassification`
eagerly on 2 threads with the same method: `full`; `lora` through HF PEFT's
`LoraConfig(r=8, alpha=16, target_modules=["query", "value"])` with the pooler and
classifier trained (as strata's head); `linear_probe` with the encoder's
`requires_grad=False`. Rounds alternate the implementations (the machine is noisy) and
the summary gives medians: tokens/s per method and impl, the strata/torch ratio, each
method's step time relative to full fine-tuning, and strata's compiled step memory (XLA's
figure for one device: parameters, optimizer state, activations, gradients).

    pip install -e .[benchmark] && pip install torch==2.13.0 peft accelerate
    python -m launch.benchmark_finetune --rounds 5
    python -m launch.benchmark_finetune --methods full,lora --no_torch
"""

import argparse
import json
import statistics
import time

import jax
import numpy as np

from configs import finetune
from train import memory
from train.trainer import build_trainer

SEQ, BATCH, CLASSES = 64, 16, 45


def make_config(method):
    c = finetune.get_config(f"method={method},size=base")
    c.data.seq_len, c.data.batch_size = SEQ, BATCH
    c.optim.update(dict(warmup_steps=0, schedule="constant", lr=1e-4))
    c.train.num_steps = 1000
    return c


def make_batch(seed, vocab):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, vocab, (BATCH, SEQ)).astype(np.int32)
    tokens[:, 0] = 2  # [CLS]
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens),
            "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape).copy(),
            "labels": rng.integers(0, CLASSES, BATCH).astype(np.int32),
            "example_weight": np.ones(BATCH, np.float32)}


class StrataMethod:
    impl = "strata"

    def __init__(self, method, batches):
        trainer = build_trainer(make_config(method))  # The loop's own builder.
        self.mesh, self.counts = trainer.mesh, trainer.counts
        self.state = trainer.init_state(seed=0)
        self.batches = [jax.device_put(b, trainer.batch_sharding) for b in batches]
        self.step = trainer.compile_train_step(self.state, self.batches[0])
        self.compiled_bytes = memory.compiled_step_bytes(self.step)
        self.index = 0

    def run(self, steps):
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batches[self.index % 2])
            self.index += 1
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start


class TorchMethod:
    impl = "torch"

    def __init__(self, method, batches, threads):
        import torch
        import transformers

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        c = make_config(method).model
        bert = transformers.BertConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden, num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads, intermediate_size=c.mlp_dim,
            max_position_embeddings=c.max_len, type_vocab_size=c.type_vocab_size,
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=CLASSES)
        model = transformers.BertForSequenceClassification(bert)
        if method == "lora":
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                modules_to_save=["classifier", "pooler"]))
        elif method == "linear_probe":
            for name, p in model.named_parameters():
                p.requires_grad = "classifier" in name or "pooler" in name
        elif method != "full":
            raise ValueError(f"--methods: torch runs full, lora, linear_probe; not {method!r}")
        self.model, self.torch = model.train(), torch
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        self.batches = [{
            "input_ids": torch.from_numpy(b["tokens"].astype(np.int64)),
            "attention_mask": torch.ones(b["tokens"].shape, dtype=torch.int64),
            "labels": torch.from_numpy(b["labels"].astype(np.int64)),
        } for b in batches]
        self.index = 0

    def run(self, steps):
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.model(**self.batches[self.index % 2]).loss
            loss.backward()
            self.torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.index += 1
        loss.item()
        return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="full,lora,linear_probe")
    parser.add_argument("--steps", type=int, default=4, help="Timed steps per measurement.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--torch_threads", type=int, default=2)
    args = parser.parse_args(argv)

    methods = args.methods.split(",")
    vocab = make_config("full").model.vocab_size
    batches = [make_batch(seed, vocab) for seed in (0, 1)]
    benches = []
    for method in methods:
        benches.append((method, StrataMethod(method, batches)))
        if not args.no_torch:
            benches.append((method, TorchMethod(method, batches, args.torch_threads)))
    for _, bench in benches:
        bench.run(args.warmup)

    tokens_per_s = {}
    for r in range(args.rounds):
        for method, bench in (benches if r % 2 == 0 else benches[::-1]):
            seconds = bench.run(args.steps) / args.steps
            tokens_per_s.setdefault((method, bench.impl), []).append(BATCH * SEQ / seconds)
            print(json.dumps({"round": r, "method": method, "impl": bench.impl,
                              "tokens_per_s": round(BATCH * SEQ / seconds, 1),
                              "step_time_s": round(seconds, 4)}), flush=True)

    summary = {}
    full = {impl: statistics.median(v) for (m, impl), v in tokens_per_s.items() if m == "full"}
    for (method, impl), values in tokens_per_s.items():
        median = statistics.median(values)
        row = summary.setdefault(method, {})
        row[f"{impl}_tokens_per_s"] = round(median, 1)
        if impl in full:  # Step time relative to full fine-tuning (lower is better).
            row[f"{impl}_step_time_vs_full"] = round(full[impl] / median, 3)
    for method, bench in benches:
        row = summary[method]
        if bench.impl == "strata":
            row["strata_trainable"] = bench.counts["trainable"]
            row["strata_compiled_step_bytes"] = bench.compiled_bytes
        else:
            row["torch_trainable"] = bench.trainable
        if "torch_tokens_per_s" in row and "strata_tokens_per_s" in row:
            row["strata_over_torch"] = round(row["strata_tokens_per_s"]
                                             / row["torch_tokens_per_s"], 3)
    print(json.dumps({"summary": summary, "seq_len": SEQ, "batch": BATCH,
                      "rounds": args.rounds, "steps": args.steps,
                      "peak_rss_bytes": memory.host_peak_rss_bytes()}, indent=1), flush=True)


if __name__ == "__main__":
    main()
