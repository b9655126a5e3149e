"""Chunked Mamba-2 (SSD) in Triton: forward and backward, wrapped in a torch.autograd.Function.

Math and notation as in chunk_torch.py (its readable twin): per chunk of BT tokens, with the folded
key k~_s = dt_s k_s and the chunk-local cumulative log-decay b_t,

    o_t = sum_{s <= t} exp(b_t - b_s) (q_t . k~_s) v_s + exp(b_t) S_prev^T q_t + D v_t
    S   = exp(b_last) S_prev + sum_s exp(b_last - b_s) k~_s v_s^T

Each kernel program owns one (sequence, head) and walks its chunks in order, keeping the running
state in registers, so no per-chunk state is ever written to memory:

- forward: one program per (value block, sequence, head), state [K, BV];
- dq: forward walk again, one program per (key block, sequence, head), state [BK, V];
- dk, dv: backward walk with the state gradient dS [K, V], one program per (sequence, head).

Backward of the decay. With G_t the cumulative log-decay over the whole sequence, every output is a
sum of exp(G_t - G_s) terms, so dL/dG_t = q_t . dq_t - k~_t . dk~_t (plus <dS_final, S_final> at
the sequence's last token), and dL/da_j = sum_{t >= j} dL/dG_t for a_j = A dt_j: a reverse cumsum of
per-token scalars, done in torch on [B, T, H] after the kernels.
"""
import torch
import triton
import triton.language as tl

from ._inputs import check_ssd_inputs

# Tile caps, warps and pipeline depth of the three kernels; bench/bench_mamba2.py sweeps these on the GPU.
KERNEL_SETTINGS = dict(
    fwd_block_v=64, fwd_warps=4,
    dq_block_k=64, dq_warps=4,
    dkdv_warps=8,
    num_stages=2,
)


@triton.jit
def _sequence_span(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """First token (in the flattened [B*T] token axis) and length of sequence i_n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos - bos


@triton.jit
def _load_tokens(ptr, rows, row_ok, i_h, H: tl.constexpr, WIDTH: tl.constexpr, cols, col_ok):
    """Tile [rows, cols] of a contiguous [tokens, H, WIDTH] tensor at head i_h; zeros outside."""
    offsets = (rows[:, None] * H + i_h) * WIDTH + cols[None, :]
    return tl.load(ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _store_tokens(ptr, tile, rows, row_ok, i_h, H: tl.constexpr, WIDTH: tl.constexpr, cols, col_ok):
    offsets = (rows[:, None] * H + i_h) * WIDTH + cols[None, :]
    tl.store(ptr + offsets, tile.to(ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _chunk_decay(dt, rows, row_ok, i_h, a_h, H: tl.constexpr, BT: tl.constexpr):
    """dt of a chunk (0 past the sequence end, so padding neither decays nor writes), b_t and b_last."""
    dt_chunk = tl.load(dt + rows * H + i_h, mask=row_ok, other=0.0).to(tl.float32)
    log_decay = tl.cumsum(a_h * dt_chunk, axis=0)
    last = tl.sum(tl.where(tl.arange(0, BT) == BT - 1, log_decay, 0.0), axis=0)
    return dt_chunk, log_decay, last


@triton.jit
def _causal_decay(log_decay, BT: tl.constexpr):
    """[BT, BT] matrix exp(b_t - b_s) for s <= t, else 0 (masked before exp: no overflow)."""
    t = tl.arange(0, BT)
    diff = log_decay[:, None] - log_decay[None, :]
    return tl.exp(tl.where(t[:, None] >= t[None, :], diff, float("-inf")))


@triton.jit
def _ssd_fwd_kernel(
    q, k, v, dt, A, D, h0, o, ht, cu_seqlens, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_D: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len = _sequence_span(cu_seqlens, i_n, T, IS_VARLEN)
    a_h = tl.load(A + i_h).to(tl.float32)
    cols_k = tl.arange(0, BK)
    cols_v = i_v * BV + tl.arange(0, BV)
    k_ok, v_ok = cols_k < K, cols_v < V
    state_offsets = i_nh.to(tl.int64) * K * V + cols_k[:, None] * V + cols_v[None, :]
    state_ok = k_ok[:, None] & v_ok[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0 + state_offsets, mask=state_ok, other=0.0).to(tl.float32)
    for start in range(0, seq_len, BT):
        tokens = start + tl.arange(0, BT)
        row_ok = tokens < seq_len
        rows = bos + tokens
        q_c = _load_tokens(q, rows, row_ok, i_h, H, K, cols_k, k_ok)
        k_c = _load_tokens(k, rows, row_ok, i_h, H, K, cols_k, k_ok)
        v_c = _load_tokens(v, rows, row_ok, i_h, H, V, cols_v, v_ok)
        dt_c, log_decay, last = _chunk_decay(dt, rows, row_ok, i_h, a_h, H, BT)
        k_folded = k_c.to(tl.float32) * dt_c[:, None]

        scores = tl.dot(q_c, tl.trans(k_folded.to(q_c.dtype)), input_precision=DOT_PRECISION)
        scores = scores * _causal_decay(log_decay, BT)
        out = tl.dot(scores.to(v_c.dtype), v_c, input_precision=DOT_PRECISION)
        q_decayed = (q_c.to(tl.float32) * tl.exp(log_decay)[:, None]).to(q_c.dtype)
        out += tl.dot(q_decayed, state.to(q_c.dtype), input_precision=DOT_PRECISION)
        if HAS_D:
            out += tl.load(D + i_h).to(tl.float32) * v_c.to(tl.float32)
        _store_tokens(o, out, rows, row_ok, i_h, H, V, cols_v, v_ok)

        k_to_end = (k_folded * tl.exp(last - log_decay)[:, None]).to(k_c.dtype)
        state = state * tl.exp(last) + tl.dot(tl.trans(k_to_end), v_c, input_precision=DOT_PRECISION)
    if STORE_HT:
        tl.store(ht + state_offsets, state, mask=state_ok)


@triton.jit
def _ssd_bwd_dq_kernel(
    q, k, v, dt, A, h0, do, dq, q_dot_dq, cu_seqlens, T, total_tokens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq_t = sum_{s <= t} exp(b_t - b_s) (do_t . v_s) k~_s + exp(b_t) S_prev do_t, per key block.

    Also writes this key block's share of q_t . dq_t (summed over blocks in torch)."""
    i_k, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len = _sequence_span(cu_seqlens, i_n, T, IS_VARLEN)
    a_h = tl.load(A + i_h).to(tl.float32)
    cols_k = i_k * BK + tl.arange(0, BK)
    cols_v = tl.arange(0, BV)
    k_ok, v_ok = cols_k < K, cols_v < V
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state_offsets = i_nh.to(tl.int64) * K * V + cols_k[:, None] * V + cols_v[None, :]
        state += tl.load(h0 + state_offsets, mask=k_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
    for start in range(0, seq_len, BT):
        tokens = start + tl.arange(0, BT)
        row_ok = tokens < seq_len
        rows = bos + tokens
        q_c = _load_tokens(q, rows, row_ok, i_h, H, K, cols_k, k_ok)
        k_c = _load_tokens(k, rows, row_ok, i_h, H, K, cols_k, k_ok)
        v_c = _load_tokens(v, rows, row_ok, i_h, H, V, cols_v, v_ok)
        do_c = _load_tokens(do, rows, row_ok, i_h, H, V, cols_v, v_ok)
        dt_c, log_decay, last = _chunk_decay(dt, rows, row_ok, i_h, a_h, H, BT)
        k_folded = k_c.to(tl.float32) * dt_c[:, None]

        do_v = tl.dot(do_c, tl.trans(v_c), input_precision=DOT_PRECISION) * _causal_decay(log_decay, BT)
        dq_c = tl.dot(do_v.to(k_c.dtype), k_folded.to(k_c.dtype), input_precision=DOT_PRECISION)
        dq_c += tl.exp(log_decay)[:, None] * tl.dot(do_c, tl.trans(state.to(do_c.dtype)), input_precision=DOT_PRECISION)
        _store_tokens(dq, dq_c, rows, row_ok, i_h, H, K, cols_k, k_ok)
        partial = tl.sum(dq_c * q_c.to(tl.float32), axis=1)
        tl.store(q_dot_dq + i_k * total_tokens * H + rows * H + i_h, partial, mask=row_ok)

        k_to_end = (k_folded * tl.exp(last - log_decay)[:, None]).to(k_c.dtype)
        state = state * tl.exp(last) + tl.dot(tl.trans(k_to_end), v_c, input_precision=DOT_PRECISION)


@triton.jit
def _ssd_bwd_dkdv_kernel(
    q, k, v, dt, A, D, do, dht, dk, dv, k_dot_dk, do_dot_v, dh0, cu_seqlens, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_D: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward walk over chunks with dS = dL/d(state at the chunk's end):

    dv_s  = sum_{t >= s} exp(b_t - b_s) (q_t . k~_s) do_t + exp(b_last - b_s) dS^T k~_s + D do_s
    dk~_s = sum_{t >= s} exp(b_t - b_s) (do_t . v_s) q_t + exp(b_last - b_s) dS v_s
    dS   <- exp(b_last) dS + sum_t exp(b_t) q_t do_t^T
    """
    i_nh = tl.program_id(0)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len = _sequence_span(cu_seqlens, i_n, T, IS_VARLEN)
    a_h = tl.load(A + i_h).to(tl.float32)
    cols_k = tl.arange(0, BK)
    cols_v = tl.arange(0, BV)
    k_ok, v_ok = cols_k < K, cols_v < V
    state_offsets = i_nh.to(tl.int64) * K * V + cols_k[:, None] * V + cols_v[None, :]
    state_ok = k_ok[:, None] & v_ok[None, :]
    d_state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        d_state += tl.load(dht + state_offsets, mask=state_ok, other=0.0).to(tl.float32)
    skip = 0.0
    if HAS_D:
        skip = tl.load(D + i_h).to(tl.float32)
    do_v_total = tl.zeros([BT], dtype=tl.float32)
    num_chunks = tl.cdiv(seq_len, BT)
    for chunk in range(num_chunks - 1, -1, -1):
        tokens = chunk * BT + tl.arange(0, BT)
        row_ok = tokens < seq_len
        rows = bos + tokens
        q_c = _load_tokens(q, rows, row_ok, i_h, H, K, cols_k, k_ok)
        k_c = _load_tokens(k, rows, row_ok, i_h, H, K, cols_k, k_ok)
        v_c = _load_tokens(v, rows, row_ok, i_h, H, V, cols_v, v_ok)
        do_c = _load_tokens(do, rows, row_ok, i_h, H, V, cols_v, v_ok)
        dt_c, log_decay, last = _chunk_decay(dt, rows, row_ok, i_h, a_h, H, BT)
        k_folded = (k_c.to(tl.float32) * dt_c[:, None]).to(k_c.dtype)
        pair_decay = _causal_decay(log_decay, BT)
        to_end = tl.exp(last - log_decay)[:, None]
        d_state_low = d_state.to(k_c.dtype)

        scores = tl.dot(q_c, tl.trans(k_folded), input_precision=DOT_PRECISION) * pair_decay
        dv_c = tl.dot(tl.trans(scores.to(do_c.dtype)), do_c, input_precision=DOT_PRECISION)
        dv_c += to_end * tl.dot(k_folded, d_state_low, input_precision=DOT_PRECISION)
        if HAS_D:
            dv_c += skip * do_c.to(tl.float32)
        _store_tokens(dv, dv_c, rows, row_ok, i_h, H, V, cols_v, v_ok)

        do_v = tl.dot(do_c, tl.trans(v_c), input_precision=DOT_PRECISION) * pair_decay
        dk_folded = tl.dot(tl.trans(do_v.to(q_c.dtype)), q_c, input_precision=DOT_PRECISION)
        dk_folded += to_end * tl.dot(v_c, tl.trans(d_state_low), input_precision=DOT_PRECISION)
        _store_tokens(dk, dk_folded * dt_c[:, None], rows, row_ok, i_h, H, K, cols_k, k_ok)
        tl.store(k_dot_dk + rows * H + i_h, tl.sum(dk_folded * k_c.to(tl.float32), axis=1), mask=row_ok)
        do_v_total += tl.sum(do_c.to(tl.float32) * v_c.to(tl.float32), axis=1)

        q_decayed = (q_c.to(tl.float32) * tl.exp(log_decay)[:, None]).to(q_c.dtype)
        d_state = d_state * tl.exp(last) + tl.dot(tl.trans(q_decayed), do_c, input_precision=DOT_PRECISION)
    if STORE_DH0:
        tl.store(dh0 + state_offsets, d_state, mask=state_ok)
    if HAS_D:
        tl.store(do_dot_v + i_nh, tl.sum(do_v_total, axis=0))


def _block(size, cap=None):
    """Power-of-two tile width >= 16 (tl.dot's minimum) covering `size`, optionally capped."""
    width = max(16, triton.next_power_of_2(size))
    return width if cap is None else min(width, cap)


def _dot_precision(dtype):
    # float32 inputs get true fp32 products; tf32 would cost ~3e-4 relative error.
    return "ieee" if dtype == torch.float32 else "tf32"


def _reverse_cumsum_per_sequence(x, cu_seqlens):
    """sum_{j >= t, j in t's sequence} x_j over the token axis of x [B, T, H], in float64."""
    x = x.double()
    suffix = x.flip(1).cumsum(1).flip(1)
    if cu_seqlens is None:
        return suffix
    # Packed sequences: subtract the suffix that starts at the next sequence.
    suffix = torch.cat([suffix, suffix.new_zeros(1, 1, x.shape[2])], dim=1)
    ends = cu_seqlens[1:].long()
    lengths = ends - cu_seqlens[:-1].long()
    next_start = torch.repeat_interleave(ends, lengths)
    return suffix[:, :-1] - suffix[:, next_start]


def _last_tokens(cu_seqlens, batch, length, device):
    """Flattened index of each sequence's last token, or -1 for an empty sequence."""
    if cu_seqlens is None:
        return torch.arange(1, batch + 1, device=device) * length - 1
    ends = cu_seqlens[1:].long()
    return torch.where(ends > cu_seqlens[:-1].long(), ends - 1, -1)


class ChunkSSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, dt, A, D, initial_state, output_final_state, cu_seqlens, chunk_size):
        B, T, H, K = q.shape
        V = v.shape[-1]
        num_seqs = B if cu_seqlens is None else cu_seqlens.numel() - 1
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        dt32, A32 = dt.float().contiguous(), A.float().contiguous()
        D32 = None if D is None else D.float().contiguous()
        h0 = None if initial_state is None else initial_state.float().contiguous()
        o = torch.empty_like(v)
        ht = torch.empty(num_seqs, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
        settings = KERNEL_SETTINGS
        BK, BV = _block(K), _block(V, cap=settings["fwd_block_v"])
        _ssd_fwd_kernel[(triton.cdiv(V, BV), num_seqs * H)](
            q, k, v, dt32, A32, D32 if D32 is not None else A32, h0 if h0 is not None else o,
            o, ht if ht is not None else o, cu_seqlens if cu_seqlens is not None else dt32, T,
            H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV,
            HAS_D=D32 is not None, HAS_H0=h0 is not None, STORE_HT=ht is not None,
            IS_VARLEN=cu_seqlens is not None, DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=settings["fwd_warps"], num_stages=settings["num_stages"],
        )
        ctx.save_for_backward(q, k, v, dt32, A32, D32, h0, ht, cu_seqlens)
        ctx.chunk_size = chunk_size
        ctx.input_dtypes = (dt.dtype, A.dtype, None if D is None else D.dtype,
                            None if initial_state is None else initial_state.dtype)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, dt, A, D, h0, ht, cu_seqlens = ctx.saved_tensors
        dt_dtype, A_dtype, D_dtype, h0_dtype = ctx.input_dtypes
        B, T, H, K = q.shape
        V = v.shape[-1]
        num_seqs = B if cu_seqlens is None else cu_seqlens.numel() - 1
        do = do.contiguous()
        dht = None if dht is None else dht.float().contiguous()
        varlen = cu_seqlens if cu_seqlens is not None else dt
        precision = _dot_precision(q.dtype)
        BT = ctx.chunk_size
        settings = KERNEL_SETTINGS
        BK_dq, BK, BV = _block(K, cap=settings["dq_block_k"]), _block(K), _block(V)
        num_k_blocks = triton.cdiv(K, BK_dq)

        dq = torch.empty_like(q)
        q_dot_dq = torch.empty(num_k_blocks, B * T, H, dtype=torch.float32, device=q.device)
        _ssd_bwd_dq_kernel[(num_k_blocks, num_seqs * H)](
            q, k, v, dt, A, h0 if h0 is not None else dt, do, dq, q_dot_dq, varlen, T, B * T,
            H=H, K=K, V=V, BT=BT, BK=BK_dq, BV=BV,
            HAS_H0=h0 is not None, IS_VARLEN=cu_seqlens is not None, DOT_PRECISION=precision,
            num_warps=settings["dq_warps"], num_stages=settings["num_stages"],
        )
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        k_dot_dk = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
        do_dot_v = torch.empty(num_seqs, H, dtype=torch.float32, device=q.device) if D is not None else None
        dh0 = torch.empty_like(h0) if h0 is not None else None
        _ssd_bwd_dkdv_kernel[(num_seqs * H,)](
            q, k, v, dt, A, D if D is not None else A, do, dht if dht is not None else dt, dk, dv,
            k_dot_dk, do_dot_v if do_dot_v is not None else dt, dh0 if dh0 is not None else dt, varlen, T,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
            HAS_D=D is not None, HAS_DHT=dht is not None, STORE_DH0=dh0 is not None,
            IS_VARLEN=cu_seqlens is not None, DOT_PRECISION=precision,
            num_warps=settings["dkdv_warps"], num_stages=settings["num_stages"],
        )

        # d/dG_t = q_t . dq_t - k~_t . dk~_t, with k~ . dk~ = dt * (k . dk~); see the module note.
        d_log_decay = q_dot_dq.sum(0).view(B, T, H) - dt * k_dot_dk
        if dht is not None:
            last = _last_tokens(cu_seqlens, B, T, q.device)
            final_term = (dht * ht).sum((-2, -1))  # [N, H]
            flat = d_log_decay.view(B * T, H)
            flat.index_add_(0, last.clamp_min(0), final_term * (last >= 0)[:, None])
        d_a = _reverse_cumsum_per_sequence(d_log_decay, cu_seqlens)
        d_dt = k_dot_dk + (d_a * A.double()).float()
        d_A = (d_a * dt.double()).sum((0, 1))
        d_D = do_dot_v.sum(0) if D is not None else None
        return (
            dq, dk, dv, d_dt.to(dt_dtype), d_A.to(A_dtype),
            None if d_D is None else d_D.to(D_dtype),
            None if dh0 is None else dh0.to(h0_dtype),
            None, None, None,
        )


def chunk_ssd(q, k, v, dt, A, D=None, initial_state=None, output_final_state=False, cu_seqlens=None, chunk_size=64):
    """Triton chunked SSD with autograd; same arguments and results as chunk_ssd_torch.

    q, k [B, T, H, K] and v [B, T, H, V] share one dtype (float32, bfloat16 or float16; o has it too);
    dt [B, T, H] and A [H] are used in float32; states are float32. chunk_size: a power of two >= 16.
    """
    check_ssd_inputs(q, k, v, dt, A, D, initial_state, cu_seqlens)
    if q.dtype != v.dtype or k.dtype != v.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if v.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"v must be float32, bfloat16 or float16 for the Triton kernel, got {v.dtype}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    return ChunkSSDFunction.apply(q, k, v, dt, A, D, initial_state, output_final_state, cu_seqlens, chunk_size)
