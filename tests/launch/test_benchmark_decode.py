"""launch/benchmark_decode.py --smollm2's bookkeeping, with stand-in decoders (the real
run loads SmolLM2 and torch: a benchmark, not a test)."""

import argparse
import json

import numpy as np

from launch import benchmark_decode


class WordTokenizer:
    def encode(self, text):
        return [sum(map(ord, w)) % 1000 for w in text.split()]


class Decoder:
    """Row b continues with b, b + 1, ...; `flip` changes token `flip` of the last row."""

    def __init__(self, name, flip=None):
        self.name, self.flip, self.calls = name, flip, []

    def __call__(self, prompts, new_tokens):
        self.calls.append((prompts.shape, new_tokens))
        out = np.arange(prompts.shape[0])[:, None] + np.arange(new_tokens)[None, :]
        if self.flip is not None and self.flip < new_tokens:
            out[-1, self.flip:] += 1  # Greedy decoding diverges for good once it differs.
        return out


def test_gloss_prompts_are_distinct_rows_of_exact_length():
    prompts = benchmark_decode.gloss_prompts(WordTokenizer(), 3, 40)
    assert prompts.shape == (3, 40) and prompts.dtype == np.int32
    assert len({tuple(row) for row in prompts}) == 3


def test_race_alternates_times_and_compares_tokens(capsys):
    args = argparse.Namespace(batch=[1, 2], prompt_len=8, new_tokens=4, rounds=2,
                              split_prefill=True)
    strata, hf = Decoder("strata"), Decoder("hf", flip=2)
    summaries = benchmark_decode.race([strata, hf], WordTokenizer(), args)
    # Per batch: a warm-up and 2 rounds, each of a 4-token and a 1-token (prefill) call.
    assert [n for _, n in strata.calls] == [4, 1] * 6 == [n for _, n in hf.calls]
    one, two = summaries
    assert one["same_tokens_fraction"] == 0.5 and one["first_difference"] == [2]
    assert two["same_tokens_fraction"] == 0.75 and two["first_difference"] == [4, 2]
    for s in summaries:
        assert s["strata_tokens_per_s"] > 0 and s["hf_per_token_ms"] >= 0
        assert s["strata_over_hf"] > 0 and len(s["strata_over_hf_per_round"]) == 2
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    rounds = [line for line in lines if "round" in line and line["new_tokens"] == 4]
    # The order flips every round: the machine is noisy.
    assert [r["implementation"] for r in rounds[:4]] == ["strata", "hf", "hf", "strata"]
