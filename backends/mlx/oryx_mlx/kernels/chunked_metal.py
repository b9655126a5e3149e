"""Chunked-parallel Metal prefill for both recurrences (same unified form as
recurrent_metal.py), in two launches.

Per chunk of C = 32 tokens with start state S0, gamma_t = cumulative log decay
inside the chunk and strength b_t, the delta rule's writes r_t satisfy
    (I + L) R = diag(b) (V - diag(exp(gamma)) K S0),
    L[t,s] = b_t exp(gamma_t - gamma_s) (k_t . k_s) for s < t   (0 for Mamba-2),
so with T = (I + L)^-1 diag(b) (the UT transform):
    R    = U + W S0,            U = T V,  W = -T diag(exp(gamma)) K  (W = 0 for Mamba-2)
    O    = Qd S0 + P R,         Qd = scale diag(exp(gamma)) Q,
                                P[t,s] = scale exp(gamma_t - gamma_s) (q_t . k_s), s <= t
    S_C  = exp(gamma_C) S0 + Kd^T R,   Kd = diag(exp(gamma_C - gamma)) K.
Launch 1 ("prepare") computes U, W, Qd, Kd, P for every chunk in parallel; launch
2 ("scan") walks the chunks of one head and value block in order, carrying S in
threadgroup memory, doing only 8x8 simdgroup matrix products. A token loop does
T sequential steps each ending in simd reductions; this does T/32 steps of dense
matrix work, which is what the GPU's matrix units are for. (Untimed: the MSL emulator
checks its correctness only.)
"""
from __future__ import annotations

import mlx.core as mx

from ._launch import KernelLaunch, MetalKernel

CHUNK = 32  # the prepare kernel scans a chunk's decays with one simdgroup
PREPARE_THREADS = 256
SCAN_THREADS = 128

_PREPARE_SOURCE = """
    static_assert(C == 32, "one simdgroup scans the decays of a chunk");
    const int tid = thread_position_in_threadgroup.x;
    const uint chunk = threadgroup_position_in_grid.y;
    const uint head_row = threadgroup_position_in_grid.z;  // b * H + h
    const uint n_chunks = threadgroups_per_grid.y;
    const int seq_len = v_shape[1];
    const int heads = v_shape[2];
    const uint b = head_row / heads;
    const uint h = head_row % heads;
    const int first = chunk * C;
    const int valid = metal::min(C, seq_len - first);
    // token t of this chunk is row (b * seq_len + first + t) * heads + h of q, k, v
    const size_t token0 = (size_t(b) * seq_len + first) * heads + h;

    threadgroup float k_tile[C * Dk];
    threadgroup float cum_decay[C];
    threadgroup float chunk_strength[C];
    threadgroup float lower[C * C];
    threadgroup float solve[C * C];

    for (int e = tid; e < C * Dk; e += NT) {
        const int t = e / Dk;
        k_tile[e] = t < valid ? static_cast<float>(k[(token0 + size_t(t) * heads) * Dk + e % Dk]) : 0.0f;
    }
    if (tid < C) {  // the first simdgroup scans the decays
        const bool live = tid < valid;
        cum_decay[tid] = simd_prefix_inclusive_sum(live ? log_decay[token0 + size_t(tid) * heads] : 0.0f);
        chunk_strength[tid] = live ? strength[token0 + size_t(tid) * heads] : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    const float scale = out_scale[h];
    const size_t chunk_row = size_t(head_row) * n_chunks + chunk;
    for (int e = tid; e < C * C; e += NT) {
        const int t = e / C;
        const int s = e % C;
        float k_dot_k = 0.0f;
        float q_dot_k = 0.0f;
        if (t < valid) {
            const size_t q_row = (token0 + size_t(t) * heads) * Dk;
            for (int i = 0; i < Dk; ++i) {
                k_dot_k += k_tile[t * Dk + i] * k_tile[s * Dk + i];
                q_dot_k += static_cast<float>(q[q_row + i]) * k_tile[s * Dk + i];
            }
        }
        const float decay = s <= t ? metal::exp(cum_decay[t] - cum_decay[s]) : 0.0f;
        lower[e] = (DELTA_RULE && s < t) ? chunk_strength[t] * decay * k_dot_k : 0.0f;
        intra[chunk_row * C * C + e] = scale * decay * q_dot_k;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    if (tid < C) {  // column c of (I + L)^-1 by forward substitution, then * b_c
        const int c = tid;
        for (int t = 0; t < C; ++t) {
            float x = t == c ? 1.0f : 0.0f;
            for (int s = c; s < t; ++s) {
                x -= lower[t * C + s] * solve[s * C + c];
            }
            solve[t * C + c] = x;
        }
        for (int t = 0; t < C; ++t) {
            solve[t * C + c] *= chunk_strength[c];
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    for (int e = tid; e < C * Dv; e += NT) {
        const int t = e / Dv;
        const int j = e % Dv;
        float acc = 0.0f;
        for (int c = 0; c < valid; ++c) {
            acc += solve[t * C + c] * static_cast<float>(v[(token0 + size_t(c) * heads) * Dv + j]);
        }
        u[chunk_row * C * Dv + e] = acc;
    }
    const float cum_last = cum_decay[C - 1];
    for (int e = tid; e < C * Dk; e += NT) {
        const int t = e / Dk;
        const int i = e % Dk;
        if (DELTA_RULE) {
            float acc = 0.0f;
            for (int c = 0; c < C; ++c) {
                acc += solve[t * C + c] * metal::exp(cum_decay[c]) * k_tile[c * Dk + i];
            }
            w_neg[chunk_row * C * Dk + e] = -acc;
        }
        const float q_ti = t < valid ? static_cast<float>(q[(token0 + size_t(t) * heads) * Dk + i]) : 0.0f;
        q_decayed[chunk_row * C * Dk + e] = scale * metal::exp(cum_decay[t]) * q_ti;
        k_decayed[chunk_row * C * Dk + e] = metal::exp(cum_last - cum_decay[t]) * k_tile[e];
    }
    if (tid == 0) {
        chunk_decay[chunk_row] = metal::exp(cum_last);
    }
"""

_SCAN_SOURCE = """
    static_assert(C % 8 == 0 && NT % 32 == 0, "8x8 tiles, whole simdgroups");
    constexpr int SIMDGROUPS = NT / 32;
    const int tid = thread_position_in_threadgroup.x;
    const uint simdgroup = simdgroup_index_in_threadgroup;
    const uint col0 = threadgroup_position_in_grid.y * BV;
    const uint head_row = threadgroup_position_in_grid.z;
    const int seq_len = v_shape[1];
    const int heads = v_shape[2];
    const uint b = head_row / heads;
    const uint h = head_row % heads;
    const uint n_chunks = (seq_len + C - 1) / C;
    const float head_skip = skip[h];

    threadgroup float state[Dk * BV];
    threadgroup float resid[C * BV];
    threadgroup float outs[C * BV];

    for (int e = tid; e < Dk * BV; e += NT) {
        state[e] = state_in[(size_t(head_row) * Dk + e / BV) * Dv + col0 + e % BV];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    for (uint n = 0; n < n_chunks; ++n) {
        const size_t chunk_row = size_t(head_row) * n_chunks + n;
        const device float* u_c = u + chunk_row * C * Dv + col0;
        const device float* w_c = w_neg + chunk_row * C * Dk;
        const device float* q_c = q_decayed + chunk_row * C * Dk;
        const device float* k_c = k_decayed + chunk_row * C * Dk;
        const device float* p_c = intra + chunk_row * C * C;

        // R = U + W S
        for (int tile = simdgroup; tile < (C / 8) * (BV / 8); tile += SIMDGROUPS) {
            const int ti = tile / (BV / 8);
            const int tj = tile % (BV / 8);
            simdgroup_float8x8 acc;
            simdgroup_load(acc, u_c + ti * 8 * Dv + tj * 8, Dv);
            if (DELTA_RULE) {
                for (int kk = 0; kk < Dk / 8; ++kk) {
                    simdgroup_float8x8 a;
                    simdgroup_float8x8 s;
                    simdgroup_load(a, w_c + ti * 8 * Dk + kk * 8, Dk);
                    simdgroup_load(s, state + kk * 8 * BV + tj * 8, BV);
                    simdgroup_multiply_accumulate(acc, a, s, acc);
                }
            }
            simdgroup_store(acc, resid + ti * 8 * BV + tj * 8, BV);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        // O = Qd S + P R
        for (int tile = simdgroup; tile < (C / 8) * (BV / 8); tile += SIMDGROUPS) {
            const int ti = tile / (BV / 8);
            const int tj = tile % (BV / 8);
            simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
            for (int kk = 0; kk < Dk / 8; ++kk) {
                simdgroup_float8x8 a;
                simdgroup_float8x8 s;
                simdgroup_load(a, q_c + ti * 8 * Dk + kk * 8, Dk);
                simdgroup_load(s, state + kk * 8 * BV + tj * 8, BV);
                simdgroup_multiply_accumulate(acc, a, s, acc);
            }
            for (int ss = 0; ss < C / 8; ++ss) {
                simdgroup_float8x8 p;
                simdgroup_float8x8 r;
                simdgroup_load(p, p_c + ti * 8 * C + ss * 8, C);
                simdgroup_load(r, resid + ss * 8 * BV + tj * 8, BV);
                simdgroup_multiply_accumulate(acc, p, r, acc);
            }
            simdgroup_store(acc, outs + ti * 8 * BV + tj * 8, BV);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        for (int e = tid; e < C * BV; e += NT) {
            const int t = n * C + e / BV;
            if (t < seq_len) {
                const size_t idx = ((size_t(b) * seq_len + t) * heads + h) * Dv + col0 + e % BV;
                out[idx] = static_cast<InT>(outs[e] + head_skip * static_cast<float>(v[idx]));
            }
        }
        const float decay = chunk_decay[chunk_row];
        for (int e = tid; e < Dk * BV; e += NT) {
            state[e] *= decay;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        // S = exp(gamma_C) S + Kd^T R
        for (int tile = simdgroup; tile < (Dk / 8) * (BV / 8); tile += SIMDGROUPS) {
            const int ti = tile / (BV / 8);
            const int tj = tile % (BV / 8);
            simdgroup_float8x8 acc;
            simdgroup_load(acc, state + ti * 8 * BV + tj * 8, BV);
            for (int ss = 0; ss < C / 8; ++ss) {
                simdgroup_float8x8 kt;
                simdgroup_float8x8 r;
                simdgroup_load(kt, k_c + ss * 8 * Dk + ti * 8, Dk, ulong2(0, 0), true);
                simdgroup_load(r, resid + ss * 8 * BV + tj * 8, BV);
                simdgroup_multiply_accumulate(acc, kt, r, acc);
            }
            simdgroup_store(acc, state + ti * 8 * BV + tj * 8, BV);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    for (int e = tid; e < Dk * BV; e += NT) {
        state_out[(size_t(head_row) * Dk + e / BV) * Dv + col0 + e % BV] = state[e];
    }
"""

PREPARE_KERNEL = MetalKernel(
    name="oryx_chunk_prepare",
    input_names=("q", "k", "v", "log_decay", "strength", "out_scale"),
    output_names=("u", "w_neg", "q_decayed", "k_decayed", "intra", "chunk_decay"),
    source=_PREPARE_SOURCE,
)

SCAN_KERNEL = MetalKernel(
    name="oryx_chunk_scan",
    input_names=("u", "w_neg", "q_decayed", "k_decayed", "intra", "chunk_decay", "v", "skip", "state_in"),
    output_names=("out", "state_out"),
    source=_SCAN_SOURCE,
)


def supports_chunked(dk: int, dv: int) -> bool:
    """The scan works in 8x8 tiles."""
    return dk % 8 == 0 and dv % 8 == 0


def value_block(dv: int) -> int:
    """Columns per scan threadgroup: small blocks give more threadgroups per head."""
    return 16 if dv % 16 == 0 else 8


def prepare_launch(q, k, v, log_decay, strength, out_scale, delta_rule: bool) -> KernelLaunch:
    batch, seq_len, heads, dk = k.shape
    dv = v.shape[-1]
    n_chunks = -(-seq_len // CHUNK)
    rows = batch * heads * n_chunks
    return KernelLaunch(
        kernel=PREPARE_KERNEL,
        inputs=(q, k, v, log_decay, strength, out_scale),
        template=(("InT", v.dtype), ("Dk", dk), ("Dv", dv), ("C", CHUNK), ("NT", PREPARE_THREADS),
                  ("DELTA_RULE", delta_rule)),
        grid=(PREPARE_THREADS, n_chunks, batch * heads),
        threadgroup=(PREPARE_THREADS, 1, 1),
        output_shapes=(
            (rows, CHUNK, dv),
            (rows, CHUNK, dk) if delta_rule else (1,),  # Mamba-2 has no W
            (rows, CHUNK, dk),
            (rows, CHUNK, dk),
            (rows, CHUNK, CHUNK),
            (rows,),
        ),
        output_dtypes=(mx.float32,) * 6,
    )


def scan_launch(prepared, v, skip, state, delta_rule: bool) -> KernelLaunch:
    """`prepared`: the six outputs of the prepare launch."""
    batch, _, heads, dv = v.shape
    dk = state.shape[2]
    block = value_block(dv)
    return KernelLaunch(
        kernel=SCAN_KERNEL,
        inputs=(*prepared, v, skip, state),
        template=(("InT", v.dtype), ("Dk", dk), ("Dv", dv), ("BV", block), ("C", CHUNK), ("NT", SCAN_THREADS),
                  ("DELTA_RULE", delta_rule)),
        grid=(SCAN_THREADS, dv // block, batch * heads),
        threadgroup=(SCAN_THREADS, 1, 1),
        output_shapes=(v.shape, state.shape),
        output_dtypes=(v.dtype, mx.float32),
    )
