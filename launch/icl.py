r"""In-context learning with a chat decoder (no weight update) and LoRA on the same examples.

Part of speech (`--task pos`, the default; train/experiments/in_context.py): the part of
speech of the word a held-out WordNet gloss defines, by constrained choice over the label
names, with k demonstrations from the training split; `--lora 8,64` adds rows for LoRA
fine-tuned on n training examples (n = k: the k-shot prompt's own demonstrations; larger
n: more of the same balanced pool), scored by the same constrained choice, zero-shot
prompt, on the same test glosses:

  python -m launch.icl --init_from gguf:smollm2 --k 0,1,3,8 --per_label 10 \
      --lora 8,64 --output runs/icl.json

WordNet questions (`--task qa`, retrieval/in_context_qa.py): held-out questions of a
small knowledge base (configs/rag.py:runlocal,gen=smollm2: hypernym and gloss questions)
answered greedily with k demonstrations, closed-book and with the exact top-2 passages:

  python -m launch.icl --task qa --k 0,1,3,8 --kb_size 1000 --questions 80 \
      --output runs/icl_qa.json

Prints a table (each score with its 95% interval) and writes it as JSON.
"""

import argparse
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="pos", choices=sorted(RUNNERS),
                        help="pos: part of speech by constrained choice; qa: WordNet questions")
    parser.add_argument("--init_from", default="gguf:smollm2",
                        help="gguf:smollm2, gguf:<path> or a strata workdir (qa: gguf: only)")
    parser.add_argument("--k", default="0,1,3,8", help="Demonstrations per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wordnet_dir", default="")
    parser.add_argument("--output", default="", help="JSON results file")
    pos = parser.add_argument_group("pos")
    pos.add_argument("--per_label", type=int, default=25,
                     help="Held-out test glosses per part of speech")
    pos.add_argument("--lora", default="",
                     help="Comma-separated training-set sizes to LoRA fine-tune on ('': none)")
    pos.add_argument("--lora_steps", type=int, default=32)
    pos.add_argument("--lora_batch", type=int, default=8)
    pos.add_argument("--lora_rank", type=int, default=8)
    pos.add_argument("--lora_lr", type=float, default=1e-3)
    qa = parser.add_argument_group("qa")
    qa.add_argument("--kb_size", type=int, default=1000)
    qa.add_argument("--questions", type=int, default=80, help="Held-out questions asked")
    qa.add_argument("--settings", default="closed_book,retrieval")
    qa.add_argument("--passages", type=int, default=2, help="Passages per prompt (top-m)")
    qa.add_argument("--max_new_tokens", type=int, default=24)
    qa.add_argument("--batch_size", type=int, default=20, help="Questions decoded together")
    args = parser.parse_args(argv)
    RUNNERS[args.task](args)


def run_pos(args):
    from launch.generate import load_decoder
    from retrieval.wordnet_qa import load_synsets
    from train.experiments import in_context, statistics
    from train.run_files import atomic_write_json

    model, params, tok = load_decoder(args.init_from, max_len=2048)
    synsets = load_synsets(args.wordnet_dir or None)
    train = in_context.pos_examples(synsets, "train", 50, args.seed)
    test = in_context.pos_examples(synsets, "test", args.per_label, args.seed + 1)
    rows = []
    for k in (int(x) for x in args.k.split(",")):
        start = time.perf_counter()
        row = in_context.evaluate_k_shot(model, params, tok, train, test, k, args.seed)
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(_pos_line(f"k={k}", row), flush=True)
    for n in (int(x) for x in args.lora.split(",") if x):
        rows.append(lora_row(args, tok, train, test, n))
        print(_pos_line(f"LoRA n={n}", rows[-1]), flush=True)
    zero_shot = next((r for r in rows if r["k"] == 0 and "lora_examples" not in r), None)
    for row in rows:  # Paired over the same test glosses: significant if 0 is outside.
        if zero_shot is not None and row is not zero_shot:
            diff, interval = statistics.paired_difference(row["correct"], zero_shot["correct"])
            p = statistics.mcnemar_exact(row["correct"], zero_shot["correct"])
            row |= {"minus_k0": diff, "minus_k0_interval": interval, "minus_k0_p": p}
            name = f"LoRA n={row['lora_examples']}" if "lora_examples" in row else \
                f"k={row['k']}"
            print(f"{name} - k=0: {diff:+.1%} [{interval[0]:+.1%}, {interval[1]:+.1%}], "
                  f"McNemar p {p:.2g}")
    if args.output:
        atomic_write_json(args.output, {"init_from": args.init_from, "task": "pos",
                                        "chance": 1 / len(in_context.CHOICES), "rows": rows})


def lora_row(args, tok, train, test, n):
    """LoRA fine-tuned on n training glosses (`pos_demonstrations(train, n)`: for n = k
    exactly the k-shot prompt's demonstrations), scored zero-shot by constrained choice."""
    from configs import decoder
    from train.experiments import in_context

    if not args.init_from.startswith("gguf:"):
        raise ValueError(f"--lora fine-tunes a GGUF decoder; --init_from={args.init_from!r}")
    examples = in_context.pos_demonstrations(train, n, args.seed)
    config = decoder.get_config(f"gguf={args.init_from.removeprefix('gguf:')},method=lora,"
                                f"lora_rank={args.lora_rank}")
    longest = max(len(tok.encode(tok.apply_chat_template(in_context.chat_messages([], e))))
                  for e in examples) + 8  # The label (<= 3 tokens) and end of turn.
    config.data.seq_len = -(-longest // 32) * 32
    config.data.batch_size = config.data.eval_batch_size = args.lora_batch
    config.optim.update(lr=args.lora_lr, warmup_steps=max(1, args.lora_steps // 8))
    config.train.num_steps = args.lora_steps
    config.seed = args.seed
    start = time.perf_counter()
    print(f"LoRA rank {args.lora_rank} on {n} glosses: {args.lora_steps} steps of "
          f"{args.lora_batch} x {config.data.seq_len} tokens", flush=True)

    def report(step, loss):
        if step % 8 == 0 or step == args.lora_steps - 1:
            print(f"  step {step}: loss {loss:.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)

    model, params, losses = in_context.fine_tune(config, tok, examples, args.seed, report)
    train_s = time.perf_counter() - start
    row = in_context.evaluate_k_shot(model, params, tok, train, test, 0, args.seed)
    return row | {"k": 0, "lora_examples": n, "lora_steps": args.lora_steps,
                  "lora_rank": args.lora_rank, "lora_lr": args.lora_lr,
                  "losses": losses, "train_seconds": train_s,
                  "seconds": time.perf_counter() - start}


def _pos_line(name, row):
    low, high = row["interval"]
    return (f"{name}: accuracy {row['accuracy']:.1%} [{low:.1%}, {high:.1%}] over "
            f"{row['examples']} glosses, predicted {row['predicted']} "
            f"({row['seconds']:.0f} s)")


def run_qa(args):
    from configs import rag as rag_config
    from retrieval import in_context_qa
    from retrieval import rag as rag_lib
    from retrieval.chat_generator import ChatGenerator
    from retrieval.rag_run import knowledge_base
    from train.embedding import load_encoder
    from train.run_files import atomic_write_json

    config = rag_config.get_config("runlocal,gen=smollm2")
    config.data.wordnet_dir = args.wordnet_dir
    config.seed = args.seed
    config.rag.update(kb_size=args.kb_size, max_eval_questions=args.questions)
    start = time.perf_counter()
    passages, questions, train_passages = knowledge_base(config)
    spec = args.init_from
    generator = ChatGenerator.from_spec(spec, max_len=2048,
                                        max_new_tokens=args.max_new_tokens,
                                        batch_size=args.batch_size)
    retriever = rag_lib.Retriever(load_encoder(config.rag.encoder), None, dict(passages),
                                  batch_size=config.rag.encode_batch_size)
    print(f"{len(passages)} KB passages, {len(questions['test'])} test questions, "
          f"{len(questions['train'])} training questions ({time.perf_counter() - start:.0f} s)",
          flush=True)
    results = in_context_qa.run(generator, retriever, questions, train_passages,
                                ks=[int(x) for x in args.k.split(",")],
                                settings=args.settings.split(","),
                                passages_per_prompt=args.passages, seed=args.seed,
                                log=lambda line: print(line, flush=True))
    results |= {"init_from": spec, "task": "qa", "kb_size": args.kb_size,
                "max_new_tokens": args.max_new_tokens,
                "seconds": time.perf_counter() - start}
    print(f"exact recall@{args.passages}: {results['retrieval']}; "
          f"{results['seconds']:.0f} s in all", flush=True)
    if args.output:
        atomic_write_json(args.output, results)


RUNNERS = {"pos": run_pos, "qa": run_qa}  # --task -> its runner.

if __name__ == "__main__":
    main()
