"""bench/bench_batch.py's token agreement: equal sequences, common prefixes, and the margin at a difference."""
import torch
from bench_scripts import load_bench_script


def test_agreement_counts_equal_sequences_and_reads_the_margin_at_the_first_difference():
    agreement = load_bench_script("bench_batch").agreement
    theirs = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    ours = [[1, 2, 3], [4, 0, 6], [2, 8, 9]]
    logits = [torch.zeros(3, 10) for _ in range(3)]
    logits[1][1, 5], logits[1][1, 0] = 2.0, 1.5    # sequence 1 differs at step 1: their token 0.5 above ours
    logits[0][2, 7], logits[0][2, 2] = 1.0, 0.999   # sequence 2 differs at step 0: a near-tie
    got = agreement(ours, theirs, logits)
    assert got["sequences_equal"] == 1 and got["sequences"] == 3
    assert got["mean_equal_prefix_tokens"] == (3 + 1 + 0) / 3
    assert got["margins_at_first_difference"] == [0.5, 0.001]
