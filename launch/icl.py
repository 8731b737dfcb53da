r"""In-context learning with a chat decoder, no weight update (train/experiments/in_context.py):
part of speech of WordNet glosses by constrained choice over the label names, with k
demonstrations from the training split, on balanced held-out glosses.

  python -m launch.icl --init_from gguf:smollm2 --k 0,1,3,8 --per_label 25 \
      --output runs/icl.json

Prints a table (accuracy with its 95% Wilson interval per k) and writes it as JSON.
"""

import argparse
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init_from", default="gguf:smollm2",
                        help="gguf:smollm2, gguf:<path> or a strata workdir")
    parser.add_argument("--k", default="0,1,3,8", help="Demonstrations per prompt")
    parser.add_argument("--per_label", type=int, default=25,
                        help="Held-out test glosses per part of speech")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wordnet_dir", default="")
    parser.add_argument("--output", default="", help="JSON results file")
    args = parser.parse_args(argv)

    from launch.generate import load_decoder
    from retrieval.wordnet_qa import load_synsets
    from train.experiments import in_context
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
        low, high = row["interval"]
        print(f"k={k}: accuracy {row['accuracy']:.1%} [{low:.1%}, {high:.1%}] over "
              f"{row['examples']} glosses, predicted {row['predicted']} "
              f"({row['seconds']:.0f} s)", flush=True)
    if args.output:
        atomic_write_json(args.output, {"init_from": args.init_from, "task": "pos",
                                        "chance": 1 / len(in_context.CHOICES), "rows": rows})


if __name__ == "__main__":
    main()
