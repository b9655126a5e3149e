"""Chunked Gated DeltaNet in Triton: forward and backward (torch.autograd.Function).

The algorithm is the one spelled out in chunk_torch.py (read that first). Per chunk of
C = 64 tokens, with G the local prefix sum of g, X = (I + L)^{-1},
W = X diag(beta e^G) K, U = X diag(beta) V:
    Delta = U - W S_0
    O     = scale diag(e^G) Q S_0 + A Delta,   A = scale (Q K^T) * e^{G_i - G_j} [i >= j]
    S_C   = e^{G_C} S_0 + (diag(e^{G_C - G}) K)^T Delta

Forward launches:
  1. _wy_fwd_kernel      (chunk, head):      G, A, X, W, U         (parallel over chunks)
  2. _state_fwd_kernel   (V block, seq*head): Delta, O, S per chunk (sequential over chunks)
Backward launches:
  3. _state_bwd_kernel   (V block, seq*head): dDelta and dS_C per chunk, reverse order
  4. _chunk_bwd_kernel   (chunk, head):      dq, dk, dv, dbeta, dg
Where a card's launch row asks for it (CARD_LAUNCH) and every sequence is whole chunks, the kernels
move their tiles with the TMA unit through tensor descriptors (_launch); otherwise through pointers.
A and X are made once per chunk by the parallel kernel and stored ([tokens, H, C], input
dtype): the sequential kernels then skip one product per chunk and V block, and the
backward reads X instead of inverting I + L again. The backward of a chunk, given dDelta
and dS_C, is one kernel with no scratch through memory.
Backward formulas (per chunk, dS_C = gradient w.r.t. the state after the chunk):
    dDelta = A^T dO + diag(e^{G_C - G}) K dS_C
    dS_0   = e^{G_C} dS_C + scale (diag(e^G) Q)^T dO - W^T dDelta
    dW = -dDelta S_0^T,  dU = dDelta,  dX = dW (beta e^G K)^T + dU (beta V)^T,
    dL = -X^T dX X^T (strictly lower part) = -(X^T dDelta) Delta^T (see _chunk_bwd_kernel).
All sequences are handled as packed (cu_seqlens) sequences; a plain batch is the packed
case with equal lengths. Intermediates (A, X, W, U, S per chunk, Delta) are kept in
the input dtype, as the matrix units take them; states and accumulators are fp32.
"""
import functools
import itertools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._inputs import check_inputs, default_scale
from ._triton_compat import patch_interpreter_scalar_index

patch_interpreter_scalar_index()
CHUNK = 64
# Narrowest key width the kernels are run at. With 32-wide keys in bf16 or fp16 on Hopper with
# Triton 3.6, dk came out wrong (o and the other gradients were right) and an initial state led to
# an illegal memory access (docs/benchmarks.md, "Narrow heads"). Zero key columns change no product
# (q.k and k.k are the same; the state's extra rows stay zero), so narrower heads run zero-padded
# to this width.
MIN_KEY_WIDTH = 64
# Launch shapes per kernel (BK, BV: key and value columns per block or program; DIAG:
# width of the diagonal blocks of I + L inverted as one batch, C = full-width doubling).
# bench/bench_gdn.py --sweep times (and checks) the alternatives and prints the fastest.
# LAUNCH is the sweep's choice at B=16, T=2048, H=16, K=V=128 bf16 on an H200, except chunk_bwd's
# second pipeline stage, which the sweep did not try and a later comparison in one process chose
# (measured in docs/benchmarks.md, "GDN launch shapes").
LAUNCH = {
    "wy_fwd": dict(BK=64, BV=64, DIAG=16, num_warps=4, num_stages=1),
    "state_fwd": dict(BV=64, num_warps=4, num_stages=1),
    "state_bwd": dict(BV=128, num_warps=8, num_stages=2),
    "chunk_bwd": dict(BK=64, BV=64, num_warps=4, num_stages=2),
}
# With fewer (sequence, head) pairs than the GPU has SMs, the two sequential kernels run one
# program per SM or less and are latency-bound: narrower value blocks (more programs) and a
# second pipeline stage for state_fwd win there (measured at B=4, T=8192, H=16 on an H200:
# docs/benchmarks.md, "GDN launch shapes").
FEW_PAIRS_LAUNCH = {
    "state_fwd": dict(BV=64, num_warps=4, num_stages=2),
    "state_bwd": dict(BV=64, num_warps=4, num_stages=1),
}
# Per card, where its own measurements chose otherwise: rows replacing those of LAUNCH, and of
# FEW_PAIRS_LAUNCH under "few_pairs"; under "tma", rows (TMA=True) that replace those where the call can
# move its tiles with the TMA unit (tensor descriptors, see _launch): 16-bit inputs, heads at most 128
# wide (as measured), every sequence whole chunks.
# The H100's rows: without TMA, chunk_bwd runs one pipeline stage; with TMA, chunk_bwd, state_bwd and the
# few-pairs state kernels run two, because TMA pays only when a second stage lets the next iteration's
# copies overlap the current one's products (measured in docs/benchmarks.md, "GDN launch shapes").
CARD_LAUNCH = {
    "H100": {
        "chunk_bwd": dict(BK=64, BV=64, num_warps=4, num_stages=1),
        "tma": {
            "state_bwd": dict(BV=128, num_warps=8, num_stages=2, TMA=True),
            "chunk_bwd": dict(BK=64, BV=64, num_warps=4, num_stages=2, TMA=True),
            "few_pairs": {
                "state_fwd": dict(BV=64, num_warps=4, num_stages=2, TMA=True),
                "state_bwd": dict(BV=64, num_warps=8, num_stages=2, TMA=True),
            },
        },
    },
}


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _load_chunk_g(gcum, bos, t0, seq_len, H, i_h, C: tl.constexpr):
    """Local cumulative log-decay of one chunk, [C]; padding rows repeat the last value
    so that e^{G_i - G_j} stays finite for every pair."""
    rows = tl.arange(0, C)
    last = tl.minimum(t0 + C, seq_len) - 1
    g_last = tl.load(gcum + (bos + last) * H + i_h)
    G = tl.load(gcum + (bos + t0 + rows) * H + i_h, mask=t0 + rows < seq_len, other=0.0)
    G = tl.where(t0 + rows < seq_len, G, g_last)
    return G, g_last


@triton.jit
def _decay_matrix(G, C: tl.constexpr, STRICT: tl.constexpr):
    """e^{G_i - G_j} on (i > j) or (i >= j), zero elsewhere."""
    rows = tl.arange(0, C)[:, None]
    cols = tl.arange(0, C)[None, :]
    keep = (rows > cols) if STRICT else (rows >= cols)
    return tl.where(keep, tl.exp(G[:, None] - G[None, :]), 0.0)


@triton.jit
def _merge_blocks(X, L, WIDTH: tl.constexpr, N: tl.constexpr, PREC: tl.constexpr):
    """X inverts each diagonal WIDTH-block of I + L; returns the inverse on 2*WIDTH-blocks.
    For a 2x2 block lower-triangular M = D + E (E the lower-left blocks), E D^-1 E = 0, so
    M^-1 = D^-1 - D^-1 E D^-1 exactly. X and L are [N, N] or a batch [NB, N, N]."""
    rows = tl.arange(0, N)[:, None]
    cols = tl.arange(0, N)[None, :]
    lower_left = ((rows // (2 * WIDTH)) == (cols // (2 * WIDTH))) & ((rows // WIDTH) != (cols // WIDTH))
    E = tl.where(lower_left, L, 0.0)
    return X - tl.dot(X, tl.dot(E, X, input_precision=PREC), input_precision=PREC)


@triton.jit
def _merge_up_to(X, L, FROM: tl.constexpr, N: tl.constexpr, PREC: tl.constexpr):
    """Merges inverse blocks of width FROM, 2 FROM, ... until X inverts all of I + L [.., N, N]."""
    for level in tl.static_range(N.bit_length() - FROM.bit_length()):
        X = _merge_blocks(X, L, FROM << level, N, PREC)
    return X


@triton.jit
def _doubling_inverse(L, N: tl.constexpr, PREC: tl.constexpr):
    """(I + L)^{-1} for strictly lower-triangular L [.., N, N] by block doubling from 1x1
    blocks: the 2x2 blocks are I - L on their subdiagonal, then each level merges pairs
    of blocks with two matrix products. Every step multiplies true inverse blocks, so no
    intermediate grows beyond the inverse itself."""
    rows = tl.arange(0, N)[:, None]
    cols = tl.arange(0, N)[None, :]
    pair_subdiagonal = ((rows // 2) == (cols // 2)) & (rows != cols)
    X = tl.where(rows == cols, 1.0, 0.0) - tl.where(pair_subdiagonal, L, 0.0)
    return _merge_up_to(X, L, 2, N, PREC)


@triton.jit
def _unit_lower_inverse(L, C: tl.constexpr, DIAG: tl.constexpr, PREC: tl.constexpr):
    """(I + L)^{-1} for strictly lower-triangular L [C, C], C and DIAG powers of two >= 16.

    The C/DIAG diagonal DIAG-blocks are inverted as one batch of small matrix products,
    then merged at full width. The early levels of a full-width doubling would spend
    C x C x C products on block-diagonal matrices; batched, the same levels cost
    (DIAG/C)^2 of that. DIAG = C is the plain full-width doubling."""
    if DIAG < C:
        NB: tl.constexpr = C // DIAG
        blocks = tl.arange(0, NB)
        same_block = blocks[:, None, None, None] == blocks[None, None, :, None]    # [NB, 1, NB, 1]
        L_diag = tl.sum(tl.where(same_block, tl.reshape(L, (NB, DIAG, NB, DIAG)), 0.0), axis=2)
        X_diag = _doubling_inverse(L_diag, DIAG, PREC)
        X = tl.reshape(tl.where(same_block, X_diag[:, :, None, :], 0.0), (C, C))
        X = _merge_up_to(X, L, DIAG, C, PREC)
    else:
        X = _doubling_inverse(L, C, PREC)
    return X


@triton.jit
def _chunk_grams(q, k, bos, seq_len, H, i_h, t0, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                 WITH_Q: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """(K K^T, Q K^T) of one chunk, [C, C] each; Q K^T only if WITH_Q."""
    kk = tl.zeros([C, C], dtype=tl.float32)
    qk = tl.zeros([C, C], dtype=tl.float32)
    for i_k in tl.static_range(K // BK):
        k_block = _load_rows(k, bos, seq_len, H, i_h, t0, i_k * BK, K, C, BK, TMA)
        kk += tl.dot(k_block, tl.trans(k_block), input_precision=PREC)
        if WITH_Q:
            q_block = _load_rows(q, bos, seq_len, H, i_h, t0, i_k * BK, K, C, BK, TMA)
            qk += tl.dot(q_block, tl.trans(k_block), input_precision=PREC)
    return kk, qk


@triton.jit
def _chunk_location(cu_seqlens, chunk_indices, i_c, C: tl.constexpr):
    i_n = tl.load(chunk_indices + 2 * i_c)
    i_t = tl.load(chunk_indices + 2 * i_c + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    return bos, eos - bos, i_t * C


@triton.jit
def _tile(base, bos, seq_len, H, i_h, t0, c0, D: tl.constexpr, C: tl.constexpr, BD: tl.constexpr):
    """Block pointer to rows t0..t0+C of one head of a [tokens, H, D] tensor, columns c0..c0+BD."""
    return tl.make_block_ptr(base + (bos * H + i_h) * D, (seq_len, D), (H * D, 1), (t0, c0), (C, BD), (1, 0))


@triton.jit
def _state_tile(base, index, i_h, H, r0, c0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Block pointer to rows r0..r0+BK, columns c0..c0+BV of one [K, V] state in a [*, H, K, V] tensor."""
    return tl.make_block_ptr(base + (index * H + i_h).to(tl.int64) * K * V, (K, V), (V, 1), (r0, c0), (BK, BV), (1, 0))


@triton.jit
def _load_rows(src, bos, seq_len, H, i_h, t0, c0, D: tl.constexpr, C: tl.constexpr, BD: tl.constexpr,
               TMA: tl.constexpr):
    """Rows t0..t0+C (zero past the sequence's end), columns c0..c0+BD of one head of a [tokens, H, D]
    tensor. With TMA, `src` is a descriptor over its [tokens, H * D] view and the copy is the TMA
    unit's; that path runs only when every sequence is whole chunks, so no tile crosses an end."""
    if TMA:
        tile = src.load([(bos + t0).to(tl.int32), i_h * D + c0])
    else:
        tile = tl.load(_tile(src, bos, seq_len, H, i_h, t0, c0, D, C, BD), boundary_check=(0, 1))
    return tile


@triton.jit
def _store_rows(dst, value, bos, seq_len, H, i_h, t0, c0, D: tl.constexpr, C: tl.constexpr, BD: tl.constexpr,
                TMA: tl.constexpr):
    """Stores `value` [C, BD], in dst's dtype, where _load_rows would load it from."""
    value = value.to(_element_type(dst.dtype))
    if TMA:
        dst.store([(bos + t0).to(tl.int32), i_h * D + c0], value)
    else:
        tl.store(_tile(dst, bos, seq_len, H, i_h, t0, c0, D, C, BD), value, boundary_check=(0, 1))


@triton.jit
def _load_state(src, index, i_h, H, r0, c0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                TMA: tl.constexpr):
    """Rows r0..r0+BK, columns c0..c0+BV of one [K, V] state in a [*, H, K, V] tensor (with TMA, a
    descriptor over its [* H K, V] view)."""
    if TMA:
        tile = src.load([((index * H + i_h) * K + r0).to(tl.int32), c0])
    else:
        tile = tl.load(_state_tile(src, index, i_h, H, r0, c0, K, V, BK, BV))
    return tile


@triton.jit
def _store_state(dst, value, index, i_h, H, r0, c0, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, TMA: tl.constexpr):
    value = value.to(_element_type(dst.dtype))
    if TMA:
        dst.store([((index * H + i_h) * K + r0).to(tl.int32), c0], value)
    else:
        tl.store(_state_tile(dst, index, i_h, H, r0, c0, K, V, BK, BV), value)


@triton.constexpr_function
def _element_type(dtype):
    """The element type of a kernel argument of this dtype: a pointer's pointee, a descriptor's own."""
    return dtype.element_ty if dtype.is_ptr() else dtype


# ----------------------------------------------------------------------------- forward
@triton.jit
def _wy_fwd_kernel(q, k, v, g, beta, w, u, x_inv, attn, gcum, cu_seqlens, chunk_indices, scale, H,
                   K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   DIAG: tl.constexpr, STORE_X: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos, seq_len, t0 = _chunk_location(cu_seqlens, chunk_indices, i_c, C)
    rows = tl.arange(0, C)
    valid = t0 + rows < seq_len
    g_c = tl.load(g + (bos + t0 + rows) * H + i_h, mask=valid, other=0.0).to(tl.float32)
    beta_c = tl.load(beta + (bos + t0 + rows) * H + i_h, mask=valid, other=0.0).to(tl.float32)
    G = tl.cumsum(g_c, axis=0)
    tl.store(gcum + (bos + t0 + rows) * H + i_h, G, mask=valid)

    kk, qk = _chunk_grams(q, k, bos, seq_len, H, i_h, t0, K, C, BK, True, PREC, TMA)
    dt: tl.constexpr = _element_type(k.dtype)
    # A is a chunk-local quantity: made here once, not in each V block of the state loops
    A = qk * scale * _decay_matrix(G, C, False)
    _store_rows(attn, A, bos, seq_len, H, i_h, t0, 0, C, C, C, TMA)
    L = beta_c[:, None] * kk * _decay_matrix(G, C, True)
    # rounded once to the input dtype: W, U and the backward all use this same X
    X_io = _unit_lower_inverse(L, C, DIAG, PREC).to(dt)
    if STORE_X:
        _store_rows(x_inv, X_io, bos, seq_len, H, i_h, t0, 0, C, C, C, TMA)
    for i_k in tl.static_range(K // BK):
        k_block = _load_rows(k, bos, seq_len, H, i_h, t0, i_k * BK, K, C, BK, TMA)
        k_scaled = (k_block * (beta_c * tl.exp(G))[:, None]).to(dt)
        w_block = tl.dot(X_io, k_scaled, input_precision=PREC)
        _store_rows(w, w_block, bos, seq_len, H, i_h, t0, i_k * BK, K, C, BK, TMA)
    for i_v in tl.static_range(V // BV):
        v_tile = _load_rows(v, bos, seq_len, H, i_h, t0, i_v * BV, V, C, BV, TMA)
        u_tile = tl.dot(X_io, (v_tile * beta_c[:, None]).to(dt), input_precision=PREC)
        _store_rows(u, u_tile, bos, seq_len, H, i_h, t0, i_v * BV, V, C, BV, TMA)


@triton.jit
def _state_fwd_kernel(q, k, w, u, attn, gcum, o, h0, ht, states, deltas, cu_seqlens, chunk_offsets, scale, H,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                      HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_CHUNKS: tl.constexpr,
                      PREC: tl.constexpr, TMA: tl.constexpr):
    """Walks the chunks of one sequence and head for state columns c0..c0+BV, writing o.
    o stays fused into this loop: a separate parallel output kernel over stored chunk states
    makes the loop shorter but the whole forward slower, in training too."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    first_chunk = tl.load(chunk_offsets + i_n)
    c0 = i_v * BV
    dt: tl.constexpr = _element_type(k.dtype)
    S = tl.zeros([K, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(_state_tile(h0, i_n, i_h, H, 0, c0, K, V, K, BV)).to(tl.float32)
    for i_t in range(tl.cdiv(seq_len, C).to(tl.int32)):
        t0 = i_t * C
        S_io = S.to(dt)
        if STORE_CHUNKS:
            _store_state(states, S_io, first_chunk + i_t, i_h, H, 0, c0, K, V, K, BV, TMA)
        G, g_last = _load_chunk_g(gcum, bos, t0, seq_len, H, i_h, C)
        k_tile = _load_rows(k, bos, seq_len, H, i_h, t0, 0, K, C, K, TMA)
        w_tile = _load_rows(w, bos, seq_len, H, i_h, t0, 0, K, C, K, TMA)
        u_tile = _load_rows(u, bos, seq_len, H, i_h, t0, c0, V, C, BV, TMA)
        delta = u_tile.to(tl.float32) - tl.dot(w_tile, S_io, input_precision=PREC)
        delta_io = delta.to(dt)
        if STORE_CHUNKS:
            _store_rows(deltas, delta_io, bos, seq_len, H, i_h, t0, c0, V, C, BV, TMA)
        q_tile = _load_rows(q, bos, seq_len, H, i_h, t0, 0, K, C, K, TMA)
        A = _load_rows(attn, bos, seq_len, H, i_h, t0, 0, C, C, C, TMA)
        q_decayed = (q_tile * (scale * tl.exp(G))[:, None]).to(dt)
        o_tile = tl.dot(q_decayed, S_io, input_precision=PREC) + tl.dot(A, delta_io, input_precision=PREC)
        _store_rows(o, o_tile, bos, seq_len, H, i_h, t0, c0, V, C, BV, TMA)
        k_to_end = (k_tile * tl.exp(g_last - G)[:, None]).to(dt)
        S = S * tl.exp(g_last) + tl.dot(tl.trans(k_to_end), delta_io, input_precision=PREC)
    if STORE_FINAL:
        tl.store(_state_tile(ht, i_n, i_h, H, 0, c0, K, V, K, BV), S)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _state_bwd_kernel(q, k, w, attn, gcum, do, dht, dh0, dstates, ddeltas, cu_seqlens, chunk_offsets, scale, H,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                      HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    first_chunk = tl.load(chunk_offsets + i_n)
    c0 = i_v * BV
    dt: tl.constexpr = _element_type(q.dtype)
    dS = tl.zeros([K, BV], dtype=tl.float32)
    if HAS_DHT:
        dS += tl.load(_state_tile(dht, i_n, i_h, H, 0, c0, K, V, K, BV)).to(tl.float32)
    num_chunks = tl.cdiv(seq_len, C).to(tl.int32)
    for step in range(num_chunks):
        i_t = num_chunks - 1 - step
        t0 = i_t * C
        _store_state(dstates, dS, first_chunk + i_t, i_h, H, 0, c0, K, V, K, BV, TMA)
        G, g_last = _load_chunk_g(gcum, bos, t0, seq_len, H, i_h, C)
        q_tile = _load_rows(q, bos, seq_len, H, i_h, t0, 0, K, C, K, TMA)
        k_tile = _load_rows(k, bos, seq_len, H, i_h, t0, 0, K, C, K, TMA)
        w_tile = _load_rows(w, bos, seq_len, H, i_h, t0, 0, K, C, K, TMA)
        do_tile = _load_rows(do, bos, seq_len, H, i_h, t0, c0, V, C, BV, TMA).to(dt)
        A_t = tl.trans(_load_rows(attn, bos, seq_len, H, i_h, t0, 0, C, C, C, TMA))
        k_to_end = (k_tile * tl.exp(g_last - G)[:, None]).to(dt)
        ddelta = tl.dot(A_t, do_tile, input_precision=PREC) \
            + tl.dot(k_to_end, dS.to(dt), input_precision=PREC)
        ddelta_io = ddelta.to(dt)
        _store_rows(ddeltas, ddelta_io, bos, seq_len, H, i_h, t0, c0, V, C, BV, TMA)
        q_decayed = (q_tile * (scale * tl.exp(G))[:, None]).to(dt)
        dS = dS * tl.exp(g_last) + tl.dot(tl.trans(q_decayed), do_tile, input_precision=PREC) \
            - tl.dot(tl.trans(w_tile), ddelta_io, input_precision=PREC)
    if STORE_DH0:
        tl.store(_state_tile(dh0, i_n, i_h, H, 0, c0, K, V, K, BV), dS)


@triton.jit
def _chunk_bwd_kernel(q, k, v, beta, gcum, x_inv, attn, states, dstates, deltas, ddeltas, do,
                      dq, dk, dv, dbeta, dg, cu_seqlens, chunk_indices, scale, H,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      PREC: tl.constexpr, TMA: tl.constexpr):
    """All gradients of one chunk once dDelta and dS_C are known.

    W and U enter only Delta = U - W S_0 = X (beta V - diag(beta e^G) K S_0), so
        dX = dW (beta e^G K)^T + dU (beta V)^T = dDelta ((I + L) Delta)^T,
        dL = -X^T dX X^T = -(X^T dDelta) Delta^T:
    the WY part needs no dW before the key loop, and no scratch goes through memory."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos, seq_len, t0 = _chunk_location(cu_seqlens, chunk_indices, i_c, C)
    rows = tl.arange(0, C)
    valid = t0 + rows < seq_len
    dt: tl.constexpr = _element_type(q.dtype)
    G, g_last = _load_chunk_g(gcum, bos, t0, seq_len, H, i_h, C)
    beta_c = tl.load(beta + (bos + t0 + rows) * H + i_h, mask=valid, other=0.0).to(tl.float32)
    k_scale = beta_c * tl.exp(G)
    # X as the forward used it; padding rows load as zero and meet only zero rows of dDelta, Delta
    X_t = tl.trans(_load_rows(x_inv, bos, seq_len, H, i_h, t0, 0, C, C, C, TMA))
    dA = tl.zeros([C, C], dtype=tl.float32)
    # accumulates -dL: a dot adds into its accumulator in place, a subtraction would keep
    # the product and the sum live side by side
    dL_neg = tl.zeros([C, C], dtype=tl.float32)
    dbeta_c = tl.zeros([C], dtype=tl.float32)
    for i_v in range(V // BV):
        c0 = i_v * BV
        do_tile = _load_rows(do, bos, seq_len, H, i_h, t0, c0, V, C, BV, TMA).to(dt)
        delta = _load_rows(deltas, bos, seq_len, H, i_h, t0, c0, V, C, BV, TMA)
        ddelta = _load_rows(ddeltas, bos, seq_len, H, i_h, t0, c0, V, C, BV, TMA)
        v_tile = _load_rows(v, bos, seq_len, H, i_h, t0, c0, V, C, BV, TMA)
        # o += A Delta
        dA += tl.dot(do_tile, tl.trans(delta), input_precision=PREC)
        # U = X (beta V) with dU = dDelta
        dv_scaled = tl.dot(X_t, ddelta, input_precision=PREC)
        dbeta_c += tl.sum(dv_scaled * v_tile.to(tl.float32), axis=1)
        _store_rows(dv, dv_scaled * beta_c[:, None], bos, seq_len, H, i_h, t0, c0, V, C, BV, TMA)
        dL_neg += tl.dot(dv_scaled.to(dt), tl.trans(delta), input_precision=PREC)
    # L = beta_i e^{G_i - G_j} k_i.k_j (i > j)
    kk, _ = _chunk_grams(k, k, bos, seq_len, H, i_h, t0, K, C, BK, False, PREC, TMA)
    kk_decayed = kk * _decay_matrix(G, C, True)
    dL = tl.where(rows[:, None] > rows[None, :], -dL_neg, 0.0)
    dbeta_c += tl.sum(dL * kk_decayed, axis=1)
    dL_g = dL * kk_decayed * beta_c[:, None]
    dG = tl.sum(dL_g, axis=1) - tl.sum(dL_g, axis=0)
    # k_i.k_j for i > j with gradient dkk_ij gives dk = (dkk + dkk^T) K
    dkk = dL * beta_c[:, None] * _decay_matrix(G, C, True)
    dkk_sym = (dkk + tl.trans(dkk)).to(dt)
    # A = scale (Q K^T) e^{G_i - G_j} [i >= j]: dA_ij A_ij is the gradient of its exponent
    A = _load_rows(attn, bos, seq_len, H, i_h, t0, 0, C, C, C, TMA)
    dA_g = dA * A.to(tl.float32)
    dG += tl.sum(dA_g, axis=1) - tl.sum(dA_g, axis=0)
    dA_io = (dA * scale * _decay_matrix(G, C, False)).to(dt)
    decay_to_end = tl.exp(g_last - G)
    from_last = tl.zeros([C], dtype=tl.float32)
    d_total_decay = tl.zeros([], dtype=tl.float32)     # d/d(e^{G_C}) of e^{G_C} S_0
    # plain loops (not unrolled): one key block's tiles are live at a time
    for i_k in range(K // BK):
        k0 = i_k * BK
        dq_acc = tl.zeros([C, BK], dtype=tl.float32)
        dw_neg = tl.zeros([C, BK], dtype=tl.float32)     # -dW, accumulated in place by the dots
        dk_state = tl.zeros([C, BK], dtype=tl.float32)
        for i_v in range(V // BV):
            c0 = i_v * BV
            S0 = _load_state(states, i_c, i_h, H, k0, c0, K, V, BK, BV, TMA)
            dSC = _load_state(dstates, i_c, i_h, H, k0, c0, K, V, BK, BV, TMA)
            delta = _load_rows(deltas, bos, seq_len, H, i_h, t0, c0, V, C, BV, TMA)
            ddelta = _load_rows(ddeltas, bos, seq_len, H, i_h, t0, c0, V, C, BV, TMA)
            do_tile = _load_rows(do, bos, seq_len, H, i_h, t0, c0, V, C, BV, TMA).to(dt)
            dq_acc += tl.dot(do_tile, tl.trans(S0), input_precision=PREC)
            dw_neg += tl.dot(ddelta, tl.trans(S0), input_precision=PREC)
            dk_state += tl.dot(delta, tl.trans(dSC), input_precision=PREC)
            d_total_decay += tl.sum(S0.to(tl.float32) * dSC.to(tl.float32))
        q_block = _load_rows(q, bos, seq_len, H, i_h, t0, k0, K, C, BK, TMA)
        k_block = _load_rows(k, bos, seq_len, H, i_h, t0, k0, K, C, BK, TMA)
        k_f32 = k_block.to(tl.float32)
        # readout of the carried state: o += scale e^G Q S_0
        dq_block = dq_acc * (scale * tl.exp(G))[:, None]
        dG += tl.sum(dq_block * q_block.to(tl.float32), axis=1)
        dq_block += tl.dot(dA_io, k_block, input_precision=PREC)
        _store_rows(dq, dq_block, bos, seq_len, H, i_h, t0, k0, K, C, BK, TMA)
        # state passed on: S_C = e^{G_C} S_0 + (e^{G_C - G} K)^T Delta
        dk_state = dk_state * decay_to_end[:, None]
        from_last += tl.sum(dk_state * k_f32, axis=1)
        # W = X (beta e^G K) with dW = -dDelta S_0^T
        dk_scaled = tl.dot(X_t, (-dw_neg).to(dt), input_precision=PREC)
        dbeta_c += tl.sum(dk_scaled * k_f32 * tl.exp(G)[:, None], axis=1)
        dG += tl.sum(dk_scaled * k_f32 * k_scale[:, None], axis=1)
        dk_block = dk_state + dk_scaled * k_scale[:, None] + tl.dot(tl.trans(dA_io), q_block, input_precision=PREC)
        dk_block += tl.dot(dkk_sym, k_block, input_precision=PREC)
        _store_rows(dk, dk_block, bos, seq_len, H, i_h, t0, k0, K, C, BK, TMA)
    dG -= from_last
    dG += tl.where(rows == C - 1, tl.sum(from_last) + d_total_decay * tl.exp(g_last), 0.0)
    # G = cumsum(g): dg_i = sum_{j >= i} dG_j (padding rows carry the last G and add nothing)
    dg_c = tl.sum(dG) - tl.cumsum(dG, axis=0) + dG
    tl.store(dbeta + (bos + t0 + rows) * H + i_h, dbeta_c.to(dbeta.dtype.element_ty), mask=valid)
    tl.store(dg + (bos + t0 + rows) * H + i_h, dg_c.to(dg.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------- host side
def _packed_layout(batch, length, cu_seqlens, device):
    """(cu_seqlens int32, chunk_indices [NC, 2] int32 of (sequence, chunk in it), chunk_offsets [N+1],
    whether every sequence is whole chunks)."""
    if cu_seqlens is None:
        lengths = (length,) * batch
    else:
        bounds = cu_seqlens.tolist()
        lengths = tuple(e - b for b, e in zip(bounds[:-1], bounds[1:]))
    return _layout_for_lengths(lengths, device)


@functools.lru_cache(maxsize=64)
def _layout_for_lengths(lengths, device):
    # Cached: building these from Python lists costs a pageable host-to-device copy,
    # which waits for the GPU, on every call.
    chunks = [-(-n // CHUNK) for n in lengths]
    offsets = [0] + list(itertools.accumulate(chunks))
    bounds = [0] + list(itertools.accumulate(lengths))
    indices = [(n, i) for n, c in enumerate(chunks) for i in range(c)]
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    whole_chunks = all(n % CHUNK == 0 for n in lengths)
    return as_tensor(bounds), as_tensor(indices).reshape(-1, 2), as_tensor(offsets), whole_chunks


_KERNELS = {"wy_fwd": _wy_fwd_kernel, "state_fwd": _state_fwd_kernel, "state_bwd": _state_bwd_kernel,
            "chunk_bwd": _chunk_bwd_kernel}


def _tma_tiles(kernel, K, V, launch):
    """{argument: tile [rows, columns]} of the tensors `kernel` moves with TMA where its row asks for it:
    [tokens, H, D] tensors C rows at a time, [chunks, H, K, V] states a [BK or K, BV] block at a time.
    These are the tiles the kernel's _load_rows / _load_state calls ask for; a mismatch fails to compile."""
    BK, BV = launch.get("BK", K), launch["BV"]
    columns = {
        "wy_fwd": dict(q=BK, k=BK, v=BV, w=BK, u=BV, x_inv=CHUNK, attn=CHUNK),
        "state_fwd": dict(q=K, k=K, w=K, u=BV, attn=CHUNK, o=BV, deltas=BV),
        "state_bwd": dict(q=K, k=K, w=K, attn=CHUNK, do=BV, ddeltas=BV),
        "chunk_bwd": dict(q=BK, k=BK, v=BV, x_inv=CHUNK, attn=CHUNK, deltas=BV, ddeltas=BV, do=BV,
                          dq=BK, dk=BK, dv=BV),
    }[kernel]
    states = {"state_fwd": dict(states=[K, BV]), "state_bwd": dict(dstates=[K, BV]),
              "chunk_bwd": dict(states=[BK, BV], dstates=[BK, BV])}.get(kernel, {})
    return {**{name: [CHUNK, width] for name, width in columns.items()}, **states}


def _descriptor_view(x):
    """(rows, width) of the 2-D view the kernels index: [tokens, H * D] or [chunks * H * K, V]."""
    width = x.shape[-1] * (x.shape[-2] if x.dim() == 3 else 1)
    return x.numel() // width, width


def _launch(kernel, grid, launch, whole_chunks, **args):
    """Runs _<kernel>_kernel at `launch` (a _launch_args row). Where the row asks for TMA, the tensors of
    _tma_tiles go as descriptors over their 2-D views if the call allows it: a Hopper-or-newer GPU (or the
    interpreter, which runs the same kernel code), tiles that never cross a sequence's end (every sequence
    whole chunks), non-empty contiguous 16-byte aligned tensors, and row offsets that fit in int32."""
    launch = dict(launch)
    tma = launch.pop("TMA", False) and whole_chunks
    if tma:
        tiles = {name: block for name, block in _tma_tiles(kernel, args["K"], args["V"], launch).items()
                 if args[name] is not None}
        views = {name: _descriptor_view(args[name]) for name in tiles}
        tma = _has_tma(args["cu_seqlens"].device) and all(
            args[name].is_contiguous() and args[name].data_ptr() % 16 == 0 and 0 < rows < 2**31
            for name, (rows, _) in views.items())
    if tma:
        for name, block in tiles.items():
            rows, width = views[name]
            args[name] = TensorDescriptor(args[name], [rows, width], [width, 1], block)
    _KERNELS[kernel][grid](**args, TMA=tma, **launch)


def _dot_precision(dtype):
    # fp32 inputs ask for fp32 accuracy: tf32x3 keeps the tensor cores at ~1e-6 error
    return "tf32x3" if dtype == torch.float32 else "tf32"


@functools.cache
def _has_tma(device) -> bool:
    """A GPU of compute capability 9 or more has the TMA unit; the interpreter runs descriptor code too."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _card(device_index: int) -> str | None:
    """The CARD_LAUNCH key naming this GPU, if any."""
    name = torch.cuda.get_device_name(device_index)
    return next((card for card in CARD_LAUNCH if card in name), None)


def _card_rows(card, few_pairs, with_tma):
    """The rows CARD_LAUNCH gives `card` (for few or many pairs): its own, then its "tma" rows if with_tma."""
    table = CARD_LAUNCH.get(card, {})
    rows = {}
    for part in (table, table.get("tma", {})) if with_tma else (table,):
        chosen = part.get("few_pairs", {}) if few_pairs else part
        rows.update({kernel: row for kernel, row in chosen.items() if kernel not in ("few_pairs", "tma")})
    return rows


def _launch_args(kernel, K, V, dtype, pairs=None, device=None, card=None, whole_chunks=True, few_pairs=None):
    """Launch shape of `kernel`; `pairs` = sequences x heads, which decides how full the GPU is (or
    `few_pairs` says it); `card` = the CARD_LAUNCH row to use, by default the one naming `device`'s GPU;
    its TMA rows where the call can use TMA (16-bit inputs, heads at most 128 wide, whole chunks)."""
    on_gpu = device is not None and device.type == "cuda"
    if few_pairs is None:
        few_pairs = pairs is not None and on_gpu and pairs < _sm_count(device.index or 0)
    few = few_pairs and kernel in FEW_PAIRS_LAUNCH
    if card is None and on_gpu:
        card = _card(device.index or 0)
    with_tma = dtype.itemsize == 2 and max(K, V) <= 128 and whole_chunks
    args = dict({**(FEW_PAIRS_LAUNCH if few else LAUNCH), **_card_rows(card, few, with_tma)}[kernel])
    args["BV"] = min(V, args["BV"])
    if "BK" in args:
        args["BK"] = min(K, args["BK"])
    if dtype == torch.float32 or max(K, V) > 128:
        # tiles twice as large (fp32, or 256-wide heads) take one pipeline stage to stay within shared
        # memory: a second one would have state_bwd ask for 272 KiB at K=V=256 in bf16 (227 KiB per block
        # on an H100 or H200)
        args["num_stages"] = 1
    if dtype == torch.float32:
        # and at most 64 columns (state_bwd with BV=128 would need 256 KiB)
        args["BV"] = min(64, args["BV"])
        if "BK" in args:
            args["BK"] = min(64, args["BK"])
    return args


def _check_triton_shapes(K, V):
    for name, d in (("K", K), ("V", V)):
        if d < 16 or d > 256 or d & (d - 1):
            raise ValueError(f"Triton GDN kernels need head size {name} a power of two in [16, 256], got {d}")


def _forward(q, k, v, g, beta, scale, initial_state, want_final, layout, keep_for_backward):
    cu, chunk_indices, chunk_offsets, whole_chunks = layout
    T_total, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    num_chunks = chunk_indices.shape[0]
    prec = _dot_precision(q.dtype)
    w = torch.empty_like(k)
    u = torch.empty_like(v)
    gcum = torch.empty(T_total, H, dtype=torch.float32, device=q.device)
    x_inv = torch.empty(T_total, H, CHUNK, dtype=q.dtype, device=q.device) if keep_for_backward else None
    attn = torch.empty(T_total, H, CHUNK, dtype=q.dtype, device=q.device)
    launch = _launch_args("wy_fwd", K, V, q.dtype, device=q.device, whole_chunks=whole_chunks)
    _launch("wy_fwd", (num_chunks, H), launch, whole_chunks,
            q=q, k=k, v=v, g=g, beta=beta, w=w, u=u, x_inv=x_inv, attn=attn, gcum=gcum, cu_seqlens=cu,
            chunk_indices=chunk_indices, scale=scale, H=H, K=K, V=V, C=CHUNK, STORE_X=keep_for_backward,
            PREC=prec)
    o = torch.empty_like(v)
    final = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device) if want_final else None
    states = torch.empty(num_chunks, H, K, V, dtype=q.dtype, device=q.device) if keep_for_backward else None
    deltas = torch.empty_like(v) if keep_for_backward else None
    launch = _launch_args("state_fwd", K, V, q.dtype, pairs=N * H, device=q.device, whole_chunks=whole_chunks)
    _launch("state_fwd", (V // launch["BV"], N * H), launch, whole_chunks,
            q=q, k=k, w=w, u=u, attn=attn, gcum=gcum, o=o, h0=initial_state, ht=final, states=states,
            deltas=deltas, cu_seqlens=cu, chunk_offsets=chunk_offsets, scale=scale, H=H, K=K, V=V, C=CHUNK,
            HAS_H0=initial_state is not None, STORE_FINAL=want_final, STORE_CHUNKS=keep_for_backward, PREC=prec)
    return o, final, (w, gcum, x_inv, attn, states, deltas)


def _backward(q, k, v, g, beta, scale, initial_state, layout, saved, do, dht):
    cu, chunk_indices, chunk_offsets, whole_chunks = layout
    w, gcum, x_inv, attn, states, deltas = saved
    T_total, H, K = q.shape
    V = v.shape[-1]
    N = cu.numel() - 1
    num_chunks = chunk_indices.shape[0]
    prec = _dot_precision(q.dtype)
    do = do.contiguous()
    dht = None if dht is None else dht.contiguous()
    dstates = torch.empty_like(states)
    ddeltas = torch.empty_like(deltas)
    dh0 = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device) if initial_state is not None else None
    launch = _launch_args("state_bwd", K, V, q.dtype, pairs=N * H, device=q.device, whole_chunks=whole_chunks)
    _launch("state_bwd", (V // launch["BV"], N * H), launch, whole_chunks,
            q=q, k=k, w=w, attn=attn, gcum=gcum, do=do, dht=dht, dh0=dh0, dstates=dstates, ddeltas=ddeltas,
            cu_seqlens=cu, chunk_offsets=chunk_offsets, scale=scale, H=H, K=K, V=V, C=CHUNK,
            HAS_DHT=dht is not None, STORE_DH0=dh0 is not None, PREC=prec)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dbeta = torch.empty_like(beta)
    dg = torch.empty_like(g)
    launch = _launch_args("chunk_bwd", K, V, q.dtype, device=q.device, whole_chunks=whole_chunks)
    _launch("chunk_bwd", (num_chunks, H), launch, whole_chunks,
            q=q, k=k, v=v, beta=beta, gcum=gcum, x_inv=x_inv, attn=attn, states=states, dstates=dstates,
            deltas=deltas, ddeltas=ddeltas, do=do, dq=dq, dk=dk, dv=dv, dbeta=dbeta, dg=dg, cu_seqlens=cu,
            chunk_indices=chunk_indices, scale=scale, H=H, K=K, V=V, C=CHUNK, PREC=prec)
    return dq, dk, dv, dg, dbeta, dh0


# ---- the kernels as torch custom ops: torch.compile traces a call to each (shapes from the fake
# implementations) without looking inside, so the graph does not break and inductor never retypes the
# kernels' arguments; autograd pairs the forward op with the backward op. A custom op returns no None:
# an absent optional tensor is an empty one (numel 0).
def _absent(t):
    return t is None or t.numel() == 0


def _empty(like):
    return like.new_empty(0)


@torch.library.custom_op("oryx::gdn_chunk_forward", mutates_args=())
def gdn_chunk_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                      cu_seqlens: torch.Tensor, chunk_indices: torch.Tensor, chunk_offsets: torch.Tensor,
                      scale: float, initial_state: torch.Tensor | None, want_final: bool, keep: bool,
                      whole_chunks: bool) -> list[torch.Tensor]:
    """Packed q, k [T, H, K], v [T, H, V], g, beta [T, H] -> [o, final, w, gcum, x_inv, attn, states, deltas]."""
    layout = (cu_seqlens, chunk_indices, chunk_offsets, whole_chunks)
    o, final, saved = _forward(q, k, v, g, beta, scale, None if _absent(initial_state) else initial_state,
                               want_final, layout, keep)
    return [o, final if final is not None else _empty(q.new_empty(0, dtype=torch.float32)),
            *(t if t is not None else _empty(q) for t in saved)]


@gdn_chunk_forward.register_fake
def _(q, k, v, g, beta, cu_seqlens, chunk_indices, chunk_offsets, scale, initial_state, want_final, keep,
      whole_chunks):
    T_total, H, K = q.shape
    V = v.shape[-1]
    N, num_chunks = cu_seqlens.shape[0] - 1, chunk_indices.shape[0]
    f32 = dict(dtype=torch.float32, device=q.device)
    final = q.new_empty(N, H, K, V, **f32) if want_final else q.new_empty(0, **f32)
    x_inv = q.new_empty(T_total, H, CHUNK) if keep else _empty(q)
    states = q.new_empty(num_chunks, H, K, V) if keep else _empty(q)
    deltas = torch.empty_like(v) if keep else _empty(q)
    return [torch.empty_like(v), final, torch.empty_like(k), q.new_empty(T_total, H, **f32), x_inv,
            q.new_empty(T_total, H, CHUNK), states, deltas]


@torch.library.custom_op("oryx::gdn_chunk_backward", mutates_args=())
def gdn_chunk_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       cu_seqlens: torch.Tensor, chunk_indices: torch.Tensor, chunk_offsets: torch.Tensor,
                       scale: float, initial_state: torch.Tensor | None, whole_chunks: bool,
                       saved: list[torch.Tensor], do: torch.Tensor, dht: torch.Tensor | None) -> list[torch.Tensor]:
    """[dq, dk, dv, dg, dbeta, dh0 (empty without an initial state)] from gdn_chunk_forward's saved tensors."""
    layout = (cu_seqlens, chunk_indices, chunk_offsets, whole_chunks)
    grads = _backward(q, k, v, g, beta, scale, None if _absent(initial_state) else initial_state, layout,
                      saved, do, None if _absent(dht) else dht)
    return [*grads[:5], grads[5] if grads[5] is not None else q.new_empty(0, dtype=torch.float32)]


@gdn_chunk_backward.register_fake
def _(q, k, v, g, beta, cu_seqlens, chunk_indices, chunk_offsets, scale, initial_state, whole_chunks, saved, do,
      dht):
    dh0 = torch.empty_like(initial_state) if not _absent(initial_state) else q.new_empty(0, dtype=torch.float32)
    return [torch.empty_like(t) for t in (q, k, v, g, beta)] + [dh0]


def _forward_setup_context(ctx, inputs, output):
    q, k, v, g, beta, cu, chunk_indices, chunk_offsets, scale, initial_state, want_final, keep, whole = inputs
    ctx.scale, ctx.whole_chunks, ctx.keep = scale, whole, keep
    ctx.save_for_backward(q, k, v, g, beta, cu, chunk_indices, chunk_offsets, initial_state, *output[2:])


def _forward_backward(ctx, grads):
    q, k, v, g, beta, cu, chunk_indices, chunk_offsets, initial_state, *saved = ctx.saved_tensors
    if not ctx.keep:
        raise RuntimeError("chunk_gated_delta_rule: backward needs the forward run with grad enabled")
    do, dht = grads[0], grads[1]
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dht = None if dht is None or dht.numel() == 0 else dht.contiguous()
    dq, dk, dv, dg, dbeta, dh0 = gdn_chunk_backward(q, k, v, g, beta, cu, chunk_indices, chunk_offsets, ctx.scale,
                                                    initial_state, ctx.whole_chunks, saved, do, dht)
    return (dq, dk, dv, dg, dbeta, None, None, None, None, None if _absent(initial_state) else dh0,
            None, None, None)


gdn_chunk_forward.register_autograd(_forward_backward, setup_context=_forward_setup_context)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None):
    """Triton chunked Gated DeltaNet (forward and backward).

    q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] log-decay; beta [B, T, H];
    initial_state [N, H, K, V] fp32; cu_seqlens [N+1] packs N sequences with B == 1.
    Returns (o [B, T, H, V] in v.dtype, final_state [N, H, K, V] fp32 or None).
    q, k, v (and the gradients) share one dtype (fp32, bf16 or fp16); g and beta are
    read as fp32. Runs on CUDA tensors, or on CPU under TRITON_INTERPRET=1.
    """
    check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check_triton_shapes(K, V)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("chunk_gated_delta_rule needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    scale = default_scale(scale, K)
    pad = max(0, MIN_KEY_WIDTH - K)
    if pad:
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
        if initial_state is not None:
            initial_state = F.pad(initial_state, (0, 0, 0, pad))
    layout = _packed_layout(B, T, cu_seqlens, q.device)
    flat = [t.reshape(B * T, *t.shape[2:]).contiguous() for t in (q, k, v, g, beta)]
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    # Grad mode is off inside Function.forward: decide here whether to keep intermediates.
    keep = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, initial_state))
    cu, chunk_indices, chunk_offsets, whole_chunks = layout
    o, final, *_ = gdn_chunk_forward(*flat, cu, chunk_indices, chunk_offsets, scale, initial_state,
                                     output_final_state, keep, whole_chunks)
    final = final if output_final_state else None
    if pad and final is not None:
        final = final[:, :, :K].contiguous()
    return o.reshape(B, T, H, V), final
