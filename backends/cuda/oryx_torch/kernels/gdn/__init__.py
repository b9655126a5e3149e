"""Gated DeltaNet kernels (fla's convention):
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale S_t^T q_t.

naive (per-token torch loop, ground truth), chunk_torch (chunked WY algorithm in torch),
chunk (Triton forward + backward), fused_recurrent (Triton token loop and decode step).
"""
import os

from .chunk_torch import chunk_gated_delta_rule_torch
from .naive import naive_recurrent_gated_delta_rule

IMPLS = ("auto", "triton", "torch", "naive")


def _triton_available(device_type):
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# The Triton entry points import triton (and decorate their kernels) on first use, so
# that importing this package stays cheap and TRITON_INTERPRET can still be set first.
def chunk_gated_delta_rule(*args, **kwargs):
    """Triton chunked forward + backward; see chunk.chunk_gated_delta_rule."""
    from .chunk import chunk_gated_delta_rule as triton_chunk
    return triton_chunk(*args, **kwargs)


def fused_recurrent_gated_delta_rule(*args, **kwargs):
    """Triton token loop (no autograd); see fused_recurrent.fused_recurrent_gated_delta_rule."""
    from .fused_recurrent import fused_recurrent_gated_delta_rule as triton_recurrent
    return triton_recurrent(*args, **kwargs)


def gated_delta_rule_decode_step(*args, **kwargs):
    """One decode token, state updated in place; see fused_recurrent.gated_delta_rule_decode_step."""
    from .fused_recurrent import gated_delta_rule_decode_step as triton_decode
    return triton_decode(*args, **kwargs)


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, impl="auto"):
    """Gated DeltaNet over whole sequences; returns (o, final_state or None).

    impl="auto" takes the Triton chunked kernels for CUDA tensors (and for CPU tensors
    when TRITON_INTERPRET=1), the chunked torch version otherwise; "triton", "torch"
    and "naive" force one.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if _triton_available(q.device.type) else "torch"
    fn = {"triton": chunk_gated_delta_rule, "torch": chunk_gated_delta_rule_torch,
          "naive": naive_recurrent_gated_delta_rule}[impl]
    return fn(q, k, v, g, beta, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def fed_fp32(kernel):
    """`kernel` (a function like gated_delta_rule) given fp32 q, k, v whatever their dtype, its output
    cast back to v's: the Triton kernels' fp32 path (tf32x3 dots) under bf16 autocast, for precision
    experiments (experiments/mqar_precision.py) and its cost (bench/gdn_feed_cost.py)."""
    def fp32_inputs(q, k, v, g, beta, **kwargs):
        o, final = kernel(q.float(), k.float(), v.float(), g, beta, **kwargs)
        return o.to(v.dtype), final
    return fp32_inputs


__all__ = [
    "chunk_gated_delta_rule", "chunk_gated_delta_rule_torch", "fed_fp32", "fused_recurrent_gated_delta_rule",
    "gated_delta_rule", "gated_delta_rule_decode_step", "naive_recurrent_gated_delta_rule",
]
