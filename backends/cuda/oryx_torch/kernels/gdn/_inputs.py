"""Argument checks and sequence bookkeeping shared by every Gated DeltaNet implementation.

All implementations view the batch as packed sequences: `[B, T, ...]` without
`cu_seqlens` is the same memory as `[1, B*T, ...]` with boundaries at multiples of T.
"""
import torch


def check_inputs(q, k, v, g, beta, initial_state=None, cu_seqlens=None):
    """Validates shapes, dtypes and devices; returns the number of sequences N."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with B, T, H = {B, T, H}, got {tuple(v.shape)}")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != q.shape[:3]:
            raise ValueError(f"{name} must be [B, T, H] = {(B, T, H)}, got {tuple(t.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if cu_seqlens is None:
        num_seqs = B
    else:
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor of cumulative lengths")
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1 (sequences packed along T), got B={B}")
        bounds = cu_seqlens.tolist()
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T:
            raise ValueError(f"cu_seqlens must start at 0 and end at T={T}, got {bounds[:1]}...{bounds[-1:]}")
        if any(b > e for b, e in zip(bounds[:-1], bounds[1:])):
            raise ValueError("cu_seqlens must be non-decreasing")
        num_seqs = len(bounds) - 1
    if initial_state is not None:
        expected = (num_seqs, H, K, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be [N, H, K, V] = {expected}, got {tuple(initial_state.shape)}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    return num_seqs


def default_scale(scale, head_dim):
    return head_dim ** -0.5 if scale is None else float(scale)
