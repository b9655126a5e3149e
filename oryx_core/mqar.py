"""Multi-query associative recall (MQAR, Zoology-style): the retrieval probe of the paper.

A sequence opens with `pairs` key-value pairs (k1 v1 k2 v2 ...), then a query section in
which every key appears again, in random order at random positions, each followed by its
value; the rest of the query section is filler. The model must predict the value after
each queried key. Keys come from the lower half of the id range, values from the upper.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FILLER = 0
IGNORE = -100


@dataclass(frozen=True)
class MQARBatch:
    inputs: np.ndarray  # int64 [N, T]
    targets: np.ndarray  # int64 [N, T]: the value to predict at each query key, IGNORE elsewhere
    query_start: int  # first index of the query section


def make_mqar(rng: np.random.Generator, n: int, seq_len: int, pairs: int, vocab_size: int) -> MQARBatch:
    if pairs < 1 or n < 1:
        raise ValueError(f"mqar: needs at least 1 pair and 1 example, got {pairs} pairs and {n} examples")
    if 4 * pairs > seq_len:
        raise ValueError(f"mqar: {pairs} pairs need seq_len >= {4 * pairs} (pairs, then their queries and answers)")
    half = vocab_size // 2
    if pairs > half - 1:
        raise ValueError(f"mqar: {pairs} distinct keys need vocab_size >= {2 * pairs + 2}")
    inputs = np.full((n, seq_len), FILLER, dtype=np.int64)
    targets = np.full((n, seq_len), IGNORE, dtype=np.int64)
    query_start = 2 * pairs
    slots = (seq_len - query_start) // 2  # a query takes two tokens: key, then its value
    for i in range(n):
        keys = rng.choice(np.arange(1, half), size=pairs, replace=False)
        values = rng.integers(half, vocab_size, size=pairs)
        inputs[i, 0:query_start:2], inputs[i, 1:query_start:2] = keys, values
        order = rng.permutation(pairs)
        where = query_start + 2 * np.sort(rng.choice(slots, size=pairs, replace=False))
        inputs[i, where], inputs[i, where + 1] = keys[order], values[order]
        targets[i, where] = values[order]
    return MQARBatch(inputs, targets, query_start)


def mqar_accuracy(logits: np.ndarray, batch: MQARBatch) -> float:
    mask = batch.targets != IGNORE
    return float((logits.argmax(-1)[mask] == batch.targets[mask]).mean())
