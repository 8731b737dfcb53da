r"""Sentence-embedding throughput: strata's `embed_texts` vs sentence-transformers.

Encodes the same WordNet glosses (the first N noun, verb, adjective and adverb glosses,
interleaved) with all-MiniLM-L6-v2 both ways, on the same threads (JAX's CPU client and
torch.set_num_threads), and prints one JSON line per round plus a summary: passages/s of
each, their median ratio, and the largest difference between the two sets of vectors.
Rounds alternate the order (the machine is noisy); strata's compilation happens in an
untimed warm-up pass, as sentence-transformers' first-call costs do.

    pip install sentence-transformers    # the reference only; it brings torch
    python -m launch.benchmark_embed --passages 5000 --rounds 3 --batch_size 64
"""

import argparse
import itertools
import json
import statistics
import time

import numpy as np

from model import hf_bert
from train import embedding
from train.data import wordnet


def wordnet_glosses(count):
    """The first `count` glosses, interleaving the four parts of speech (varied lengths)."""
    directory = wordnet.resolve_wordnet_dir()
    streams = [(s.gloss for s in wordnet.iter_synsets(directory, pos) if s.gloss)
               for pos in ("noun", "verb", "adj", "adv")]
    glosses = [g for group in itertools.zip_longest(*streams) for g in group if g]
    return glosses[:count]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init_from", default="hf:minilm")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    texts = wordnet_glosses(args.passages)
    params, model, tok, max_len = embedding.load_encoder(args.init_from)
    encode_fn = embedding.make_encode_fn(model)
    reference = SentenceTransformer(hf_bert.resolve_dir(args.init_from), device="cpu")

    def run_strata():
        return embedding.embed_texts(params, model, tok, texts, args.batch_size, max_len,
                                     encode_fn=encode_fn)

    def run_reference():
        return reference.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)

    start = time.perf_counter()
    ours = run_strata()  # Compiles each length bucket once.
    print(json.dumps({"strata_warmup_s": round(time.perf_counter() - start, 2)}), flush=True)
    theirs = run_reference()
    rates = {"strata": [], "sentence_transformers": []}
    runs = {"strata": run_strata, "sentence_transformers": run_reference}
    for r in range(args.rounds):
        for name in (("strata", "sentence_transformers") if r % 2 == 0
                     else ("sentence_transformers", "strata")):
            start = time.perf_counter()
            runs[name]()
            rate = len(texts) / (time.perf_counter() - start)
            rates[name].append(rate)
            print(json.dumps({"round": r, "impl": name, "passages_per_s": round(rate, 1)}),
                  flush=True)
    summary = {
        "passages": len(texts), "batch_size": args.batch_size, "threads": args.threads,
        "strata_passages_per_s": round(statistics.median(rates["strata"]), 1),
        "sentence_transformers_passages_per_s": round(
            statistics.median(rates["sentence_transformers"]), 1),
        "ratio_median": round(statistics.median(
            s / t for s, t in zip(rates["strata"], rates["sentence_transformers"])), 3),
        "max_abs_diff": float(np.abs(ours - theirs).max()),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
