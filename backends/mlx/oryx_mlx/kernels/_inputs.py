"""Argument checks shared by every implementation, and the reduction of both
recurrences to one form:

    S_t = exp(log_decay_t) S_{t-1} + k_t delta_t^T,
    delta_t = strength_t (v_t - S'^T k_t)   (delta rule, S' = exp(log_decay_t) S_{t-1})
            = strength_t v_t                (Mamba-2),
    o_t = out_scale_h S_t^T q_t + skip_h v_t.

Gated DeltaNet: log_decay = g, strength = beta, out_scale = scale, skip = 0.
Mamba-2:        log_decay = A_h dt_t, strength = dt_t, out_scale = 1, skip = D_h.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

INPUT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


@dataclass(frozen=True)
class Recurrence:
    q: mx.array  # [B, T, H, K]
    k: mx.array  # [B, T, H, K]
    v: mx.array  # [B, T, H, V]
    log_decay: mx.array  # [B, T, H] float32
    strength: mx.array  # [B, T, H] float32
    out_scale: mx.array  # [H] float32
    skip: mx.array  # [H] float32
    state: mx.array  # [B, H, K, V] float32
    delta_rule: bool

    @property
    def args(self) -> tuple:
        return (self.q, self.k, self.v, self.log_decay, self.strength, self.out_scale, self.skip, self.state)


def _check_shape(name: str, array: mx.array, shape: tuple) -> None:
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(array.shape)}")


def _check_qkv(q, k, v) -> tuple[int, int, int, int, int]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, T, H, D], got shape {tuple(x.shape)}")
        if x.dtype not in INPUT_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, seq_len, heads, dk = k.shape
    _check_shape("q", q, k.shape)
    _check_shape("v", v, (batch, seq_len, heads, v.shape[-1]))
    if seq_len < 1 or dk < 1 or v.shape[-1] < 1:
        raise ValueError(f"need T, K, V >= 1, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    return batch, seq_len, heads, dk, v.shape[-1]


def _initial_state(state, batch, heads, dk, dv) -> mx.array:
    if state is None:
        return mx.zeros((batch, heads, dk, dv), mx.float32)
    _check_shape("state", state, (batch, heads, dk, dv))
    return state.astype(mx.float32)


def gated_delta_inputs(q, k, v, g, beta, state=None, scale=None) -> Recurrence:
    batch, seq_len, heads, dk, dv = _check_qkv(q, k, v)
    _check_shape("g", g, (batch, seq_len, heads))
    _check_shape("beta", beta, (batch, seq_len, heads))
    scale = dk**-0.5 if scale is None else float(scale)
    return Recurrence(
        q, k, v,
        log_decay=g.astype(mx.float32),
        strength=beta.astype(mx.float32),
        out_scale=mx.full((heads,), scale, mx.float32),
        skip=mx.zeros((heads,), mx.float32),
        state=_initial_state(state, batch, heads, dk, dv),
        delta_rule=True,
    )


def ssd_inputs(q, k, v, dt, A, D, state=None) -> Recurrence:
    batch, seq_len, heads, dk, dv = _check_qkv(q, k, v)
    _check_shape("dt", dt, (batch, seq_len, heads))
    _check_shape("A", A, (heads,))
    _check_shape("D", D, (heads,))
    dt = dt.astype(mx.float32)
    return Recurrence(
        q, k, v,
        log_decay=dt * A.astype(mx.float32),
        strength=dt,
        out_scale=mx.ones((heads,), mx.float32),
        skip=D.astype(mx.float32),
        state=_initial_state(state, batch, heads, dk, dv),
        delta_rule=False,
    )
