"""Recurrence kernels of the MLX backend: Gated DeltaNet and Mamba-2 (SSD) state
updates, as Metal kernels (token loop and chunked prefill) with pure-MLX fallbacks.

Choosing the implementation: the `impl` argument, else the environment variable
ORYX_MLX_KERNELS, else "auto".
  "metal": our Metal kernels (needs mx.metal.is_available()).
  "mlx":   pure MLX ops (per-token loop for short inputs, chunked for long ones).
  "fast":  mx.fast.gated_delta_update for Gated DeltaNet. It differs from ours in
           form (decay passed as exp(g), no output scale, state stored [B, H, V, K]),
           which we convert, and in precision for float16/bfloat16 inputs, so we call
           it on float32 copies. It has no Mamba-2 form: ssd_recurrence treats
           "fast" as "auto".
  "auto":  "metal" where Metal is available, else "mlx".
"""
from __future__ import annotations

import os

import mlx.core as mx

from . import fallback
from ._inputs import Recurrence, gated_delta_inputs, ssd_inputs
from .metal import run_metal

IMPLEMENTATIONS = ("auto", "metal", "mlx", "fast")
ENV_VAR = "ORYX_MLX_KERNELS"
# The pure-MLX chunked form overtakes the per-token loop between 32 and 64 tokens
# (on a CPU at H=8, K=V=128: docs/benchmarks.md, "MLX kernels on a CPU").
FALLBACK_CHUNKED_MIN_TOKENS = 64

__all__ = ["gated_delta_recurrence", "ssd_recurrence", "IMPLEMENTATIONS", "ENV_VAR"]


def _default_impl() -> str:
    return "metal" if mx.metal.is_available() else "mlx"


def _resolve(impl: str) -> str:
    if impl == "auto":
        impl = os.environ.get(ENV_VAR, "auto") or "auto"
        source = f"environment variable {ENV_VAR}"
    else:
        source = "impl"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"{source} must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        impl = _default_impl()
    if impl == "metal" and not mx.metal.is_available():
        raise ValueError(f"{source} asks for 'metal' but Metal is not available here")
    return impl


def _run_portable(r: Recurrence, impl: str):
    if impl == "metal":
        return run_metal(r)
    if r.k.shape[1] >= FALLBACK_CHUNKED_MIN_TOKENS:
        return fallback.run_chunked(r)
    return fallback.run_tokenwise(r)


def run_fast_gated_delta(r: Recurrence):
    """mx.fast.gated_delta_update in our conventions. It is fed float32: given
    float16/bfloat16 inputs it rounds its state path to that type, and the state's error
    grows by orders of magnitude (docs/benchmarks.md, "MLX kernels on a CPU")."""
    scale = r.out_scale[0]  # one scale for every head in gated_delta_inputs
    q, k, v = (x.astype(mx.float32) for x in (r.q, r.k, r.v))
    out, state = mx.fast.gated_delta_update(
        q * scale, k, v, mx.exp(r.log_decay), r.strength, mx.swapaxes(r.state, -1, -2)
    )
    return out.astype(r.v.dtype), mx.swapaxes(state, -1, -2).astype(mx.float32)


def gated_delta_recurrence(q, k, v, g, beta, state=None, scale=None, impl: str = "auto"):
    """Gated DeltaNet: S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    o_t = scale S_t^T q_t (q, k L2-normalised by the caller; scale defaults to K^-1/2).

    q, k [B,T,H,K]; v [B,T,H,V]; g (log decay <= 0), beta [B,T,H]; state [B,H,K,V]
    (zeros if None). Returns (o [B,T,H,V] in v's dtype, new state [B,H,K,V] float32).
    """
    r = gated_delta_inputs(q, k, v, g, beta, state, scale)
    impl = _resolve(impl)
    if impl == "fast":
        return run_fast_gated_delta(r)
    return _run_portable(r, impl)


def ssd_recurrence(q, k, v, dt, A, D, state=None, impl: str = "auto"):
    """Mamba-2: S_t = exp(A_h dt_t) S_{t-1} + dt_t k_t v_t^T, o_t = S_t^T q_t + D_h v_t.

    q (C), k (B) [B,T,H,K]; v (x) [B,T,H,V]; dt [B,T,H] (> 0, softplus applied);
    A [H] (< 0); D [H]; state [B,H,K,V] (zeros if None). Returns (o [B,T,H,V] in v's
    dtype, new state [B,H,K,V] float32).
    """
    r = ssd_inputs(q, k, v, dt, A, D, state)
    impl = _resolve(impl)
    if impl == "fast":  # mx.fast has no Mamba-2 recurrence
        impl = _default_impl()
    return _run_portable(r, impl)
