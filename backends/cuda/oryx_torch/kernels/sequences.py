"""The sequences of a kernel call: a batch of equal-length rows, or one row of packed sequences."""
from __future__ import annotations


def sequence_bounds(batch: int, length: int, cu_seqlens=None) -> list[tuple[int, int, int]]:
    """(row, first token, end token) of each sequence, in the order of the state's N axis.

    Without cu_seqlens each of the `batch` rows is one sequence of `length` tokens; with it
    (batch 1), the sequences are cu_seqlens' consecutive spans of row 0.
    """
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    bounds = cu_seqlens.tolist()
    return [(0, bos, eos) for bos, eos in zip(bounds, bounds[1:])]
