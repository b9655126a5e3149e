"""Argument checks and small helpers shared by every Mamba-2 (SSD) implementation."""
import torch


def _fail(message):
    raise ValueError(message)


def check_ssd_inputs(q, k, v, dt, A, D=None, initial_state=None, cu_seqlens=None):
    """Raise a one-line ValueError naming the first bad argument; return the number of sequences N."""
    if q.dim() != 4:
        _fail(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        _fail(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        _fail(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if dt.shape != (B, T, H):
        _fail(f"dt must be [B, T, H] = [{B}, {T}, {H}], got {tuple(dt.shape)}")
    if A.shape != (H,):
        _fail(f"A must be [H] = [{H}], got {tuple(A.shape)}")
    if D is not None and D.shape != (H,):
        _fail(f"D must be [H] = [{H}], got {tuple(D.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v), ("dt", dt), ("A", A), ("D", D), ("initial_state", initial_state)):
        if x is None:
            continue
        if not x.is_floating_point():
            _fail(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != q.device:
            _fail(f"{name} is on {x.device} but q is on {q.device}")
    num_seqs = B
    if cu_seqlens is not None:
        if B != 1:
            _fail(f"cu_seqlens needs the sequences packed into batch 1, got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            _fail(f"cu_seqlens must be a 1-D integer tensor [N + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(a > b for a, b in zip(bounds, bounds[1:])):
            _fail(f"cu_seqlens must rise from 0 to T={T}, got {bounds}")
        num_seqs = len(bounds) - 1
    V = v.shape[3]
    if initial_state is not None and initial_state.shape != (num_seqs, H, K, V):
        _fail(f"initial_state must be [N, H, K, V] = [{num_seqs}, {H}, {K}, {V}], got {tuple(initial_state.shape)}")
    return num_seqs


def compute_dtype(x):
    """float64 stays float64 (reference runs); everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
