"""Token-by-token Metal kernel for both recurrences (prefill loops over time inside
the kernel; decode is the same kernel with T = 1).

One simdgroup owns one column j of one head's state S[:, j] (K floats, spread over
the 32 lanes, ROWS per lane, in registers). Per token it needs two simd_sum
reductions for the delta rule (k.S and q.S) and one for Mamba-2 (q.S). The state
columns of a head never interact, so no threadgroup memory or barrier is needed.

Unified recurrence (per batch b, head h, column j):
    s      <- exp(log_decay_t) * s
    delta  <- strength_t * (v_t[j] - k_t . s)    if DELTA_RULE  (Gated DeltaNet)
              strength_t * v_t[j]                otherwise      (Mamba-2)
    s      <- s + k_t * delta
    o_t[j] <- out_scale[h] * (q_t . s) + skip[h] * v_t[j]
"""
from __future__ import annotations

import mlx.core as mx

from ._launch import KernelLaunch, MetalKernel

SIMD_WIDTH = 32
COLUMNS_PER_THREADGROUP = 4

_SOURCE = """
    constexpr int ROWS = (Dk + 31) / 32;
    const uint lane = thread_position_in_grid.x;
    const uint column = thread_position_in_grid.y;
    const uint head_row = thread_position_in_grid.z;  // b * H + h
    const int seq_len = v_shape[1];
    const int heads = v_shape[2];
    const uint b = head_row / heads;
    const uint h = head_row % heads;

    const size_t state_column = size_t(head_row) * Dk * Dv + column;
    float s[ROWS];
    for (int r = 0; r < ROWS; ++r) {
        const uint i = lane + 32 * r;
        s[r] = i < Dk ? state_in[state_column + size_t(i) * Dv] : 0.0f;
    }
    const float head_scale = out_scale[h];
    const float head_skip = skip[h];

    for (int t = 0; t < seq_len; ++t) {
        const size_t token = (size_t(b) * seq_len + t) * heads + h;
        // Offsets, not pointers: MLX binds inputs under 8 elements as `constant`.
        const size_t qk_row = token * Dk;
        const float v_j = static_cast<float>(v[token * Dv + column]);
        const float decay = metal::exp(log_decay[token]);

        float k_reg[ROWS];
        float k_dot_s = 0.0f;
        for (int r = 0; r < ROWS; ++r) {
            const uint i = lane + 32 * r;
            k_reg[r] = i < Dk ? static_cast<float>(k[qk_row + i]) : 0.0f;
            s[r] *= decay;
            k_dot_s += k_reg[r] * s[r];
        }
        float delta = strength[token] * v_j;
        if (DELTA_RULE) {
            delta -= strength[token] * simd_sum(k_dot_s);
        }
        float q_dot_s = 0.0f;
        for (int r = 0; r < ROWS; ++r) {
            const uint i = lane + 32 * r;
            s[r] += k_reg[r] * delta;
            q_dot_s += (i < Dk ? static_cast<float>(q[qk_row + i]) : 0.0f) * s[r];
        }
        q_dot_s = simd_sum(q_dot_s);
        if (lane == 0) {
            out[token * Dv + column] = static_cast<InT>(head_scale * q_dot_s + head_skip * v_j);
        }
    }
    for (int r = 0; r < ROWS; ++r) {
        const uint i = lane + 32 * r;
        if (i < Dk) {
            state_out[state_column + size_t(i) * Dv] = s[r];
        }
    }
"""

RECURRENT_KERNEL = MetalKernel(
    name="oryx_linear_recurrence",
    input_names=("q", "k", "v", "log_decay", "strength", "out_scale", "skip", "state_in"),
    output_names=("out", "state_out"),
    source=_SOURCE,
)


def recurrent_launch(q, k, v, log_decay, strength, out_scale, skip, state, delta_rule: bool) -> KernelLaunch:
    """q, k [B,T,H,K], v [B,T,H,V] (one dtype); log_decay, strength [B,T,H] fp32;
    out_scale, skip [H] fp32; state [B,H,K,V] fp32. Outputs (o, new state)."""
    batch, _, heads, dk = k.shape
    dv = v.shape[-1]
    return KernelLaunch(
        kernel=RECURRENT_KERNEL,
        inputs=(q, k, v, log_decay, strength, out_scale, skip, state),
        template=(("InT", v.dtype), ("Dk", dk), ("Dv", dv), ("DELTA_RULE", delta_rule)),
        grid=(SIMD_WIDTH, dv, batch * heads),
        threadgroup=(SIMD_WIDTH, min(COLUMNS_PER_THREADGROUP, dv), 1),
        output_shapes=(v.shape, state.shape),
        output_dtypes=(v.dtype, mx.float32),
    )
