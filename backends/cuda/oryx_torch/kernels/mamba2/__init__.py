"""Mamba-2 (SSD) recurrence kernels for the CUDA backend.

Layout (parallel to kernels.gdn): x = v, B = k, C = q with one B/C per head;
q, k [B, T, H, K], v [B, T, H, V], dt [B, T, H] (softplus'd), A [H] (negative), D [H] optional,
fp32 states [N, H, K, V], `cu_seqlens` [N + 1] for packed sequences (B == 1).

- naive_recurrent_ssd: per-token torch loop, float64-capable ground truth.
- chunk_ssd_torch: chunked SSD in pure torch (autograd), the CPU path.
- chunk_ssd: Triton chunked forward + backward (autograd), the GPU training path.
- fused_recurrent_ssd / ssd_decode_step: Triton inference kernels (decode updates state in place,
  optional fused KV-cache append).
- ssd: dispatcher over the chunked implementations.
"""
from .chunk_torch import chunk_ssd_torch
from .naive import naive_recurrent_ssd

IMPLEMENTATIONS = ("auto", "triton", "torch", "naive")


def ssd(q, k, v, dt, A, D=None, initial_state=None, output_final_state=False, cu_seqlens=None,
        chunk_size=64, impl="auto"):
    """Mamba-2 over whole sequences; returns (o, final_state or None).

    impl: "auto" (Triton on CUDA tensors, torch chunked elsewhere), "triton", "torch" or "naive".
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    if impl == "naive":
        return naive_recurrent_ssd(q, k, v, dt, A, D, initial_state, output_final_state, cu_seqlens)
    if impl == "torch":
        return chunk_ssd_torch(q, k, v, dt, A, D, initial_state, output_final_state, cu_seqlens, chunk_size)
    from .chunk import chunk_ssd  # Triton is imported only when asked for

    return chunk_ssd(q, k, v, dt, A, D, initial_state, output_final_state, cu_seqlens, chunk_size)


def __getattr__(name):
    # The Triton entry points load lazily, so CPU-only installs without Triton can import this package.
    if name == "chunk_ssd":
        from .chunk import chunk_ssd

        return chunk_ssd
    if name in ("fused_recurrent_ssd", "ssd_decode_step"):
        from . import fused_recurrent

        return getattr(fused_recurrent, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["chunk_ssd", "chunk_ssd_torch", "fused_recurrent_ssd", "naive_recurrent_ssd", "ssd", "ssd_decode_step"]
