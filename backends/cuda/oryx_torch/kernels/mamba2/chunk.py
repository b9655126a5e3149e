"""Chunked Mamba-2 (SSD) in Triton: forward and backward, wrapped in a torch.autograd.Function.

Math and notation as in chunk_torch.py (its readable twin): per chunk of BT tokens, with the
chunk-local cumulative log-decay b_t (b_last at the chunk's end),

    o_t = sum_{s <= t} exp(b_t - b_s) dt_s (q_t . k_s) v_s + exp(b_t) S_prev^T q_t + D v_t
    S   = exp(b_last) S_prev + sum_s exp(b_last - b_s) dt_s k_s v_s^T

Each kernel program owns one (sequence, head) and walks its chunks in order, keeping the running
state in registers:

- forward: one program per (value block, sequence, head), state [K, BV]; only the final state is
  written;
- dq: forward walk again, one program per (key block, sequence, head), state [BK, V]; it also
  writes the state each chunk starts from, S_prev (fp32), for the decay gradient below;
- dk: backward walk with the key-block rows of the state gradient dS, one program per (key block,
  sequence, head);
- dv, ddt, dA, dD: backward walk with the value-block columns of dS, one program per (value block,
  sequence, head); its ddt, dA, dD are per-block shares summed in torch.

Scalings by dt and by decays go onto [BT, BT] score tiles or onto rows of dot results rather than
onto [BT, K] operand tiles, which keeps register pressure down.

Decay gradient. Within chunk c, b_t = sum_{j <= t} a_j with a_j = A dt_j. With k~ = dt k, dS the
gradient of the state at the chunk's end and C_ts = exp(b_t - b_s) dt_s (q_t . k_s)(do_t . v_s)
for s <= t, every way a_j moves the loss gives

    dL/da_j = sum_{t >= j} (sum_s C_ts - sum_s C_st + q_t . dq~_t^inter)      (t, s in chunk c)
            + sum_{s < j} k~_s . dk~_s^inter + exp(b_last) <dS, S_prev>,

where dq~^inter = exp(b_t) S_prev do_t and dk~^inter = exp(b_last - b_s) dS v_s are the parts of
dq and dk~ that go through the states. Each term is computed once: the intra-chunk pairs as row minus
column sums of one fp32 matrix, and nothing is summed across chunks except through <dS, S_prev>.
(The textbook route, a reverse cumsum of q.dq - k~.dk~ over the whole sequence, is exact in real
arithmetic but in bf16 cancellation leaves dA with errors of order 100%; so does summing
<dS, S_end> against the k~.dk~^inter terms it should cancel, at the percent level.)
"""
import torch
import triton
import triton.language as tl

from ..gdn._triton_compat import patch_interpreter_scalar_index
from ._inputs import check_ssd_inputs

patch_interpreter_scalar_index()

# Tile caps, warps and pipeline depth of the four kernels (bench/bench_mamba2.py --sweep times variants).
KERNEL_SETTINGS = dict(
    fwd_block_v=64, fwd_warps=8,
    bwd_block_k=64, dq_warps=8, dk_warps=8,
    dv_block_v=64, dv_warps=8,
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
    return bos, (eos - bos).to(tl.int32)


@triton.jit
def _token_tile(ptr, bos, seq_len, i_h, H: tl.constexpr, WIDTH: tl.constexpr, chunk, col_start,
                BT: tl.constexpr, BW: tl.constexpr):
    """Block pointer to the [BT, BW] tile of chunk `chunk` in one head of a contiguous [tokens, H, WIDTH]
    tensor, for a sequence starting at token `bos` (block pointers keep address math out of registers)."""
    return tl.make_block_ptr(ptr + (bos * H + i_h) * WIDTH, (seq_len, WIDTH), (H * WIDTH, 1),
                             (chunk * BT, col_start), (BT, BW), (1, 0))


@triton.jit
def _load_tokens(ptr, bos, seq_len, i_h, H: tl.constexpr, WIDTH: tl.constexpr, chunk, col_start,
                 BT: tl.constexpr, BW: tl.constexpr):
    """The tile of _token_tile, zeros past the sequence end and the row width."""
    tile = _token_tile(ptr, bos, seq_len, i_h, H, WIDTH, chunk, col_start, BT, BW)
    return tl.load(tile, boundary_check=(0, 1), padding_option="zero")


@triton.jit
def _store_tokens(ptr, values, bos, seq_len, i_h, H: tl.constexpr, WIDTH: tl.constexpr, chunk, col_start,
                  BT: tl.constexpr, BW: tl.constexpr):
    tile = _token_tile(ptr, bos, seq_len, i_h, H, WIDTH, chunk, col_start, BT, BW)
    tl.store(tile, values.to(ptr.dtype.element_ty), boundary_check=(0, 1))


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
def _chunk_base(chunk_offsets, i_n, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Index of sequence i_n's first chunk in the per-chunk state buffer."""
    if IS_VARLEN:
        return tl.load(chunk_offsets + i_n).to(tl.int64)
    return i_n.to(tl.int64) * tl.cdiv(T, BT)


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
    skip = 0.0
    if HAS_D:
        skip = tl.load(D + i_h).to(tl.float32)
    k_start = 0
    cols_k = tl.arange(0, BK)
    v_start = i_v * BV
    cols_v = v_start + tl.arange(0, BV)
    k_ok, v_ok = cols_k < K, cols_v < V
    state_offsets = i_nh.to(tl.int64) * K * V + cols_k[:, None] * V + cols_v[None, :]
    state_ok = k_ok[:, None] & v_ok[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0 + state_offsets, mask=state_ok, other=0.0).to(tl.float32)
    for chunk in range(0, tl.cdiv(seq_len, BT)):
        tokens = chunk * BT + tl.arange(0, BT)
        row_ok = tokens < seq_len
        rows = bos + tokens
        q_c = _load_tokens(q, bos, seq_len, i_h, H, K, chunk, k_start, BT, BK)
        k_c = _load_tokens(k, bos, seq_len, i_h, H, K, chunk, k_start, BT, BK)
        v_c = _load_tokens(v, bos, seq_len, i_h, H, V, chunk, v_start, BT, BV)
        dt_c, log_decay, last = _chunk_decay(dt, rows, row_ok, i_h, a_h, H, BT)

        scores = tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PRECISION)
        scores = scores * _causal_decay(log_decay, BT) * dt_c[None, :]
        out = tl.dot(scores.to(v_c.dtype), v_c, input_precision=DOT_PRECISION)
        inter = tl.dot(q_c, state.to(q_c.dtype), input_precision=DOT_PRECISION)
        out += tl.exp(log_decay)[:, None] * inter + skip * v_c.to(tl.float32)
        _store_tokens(o, out, bos, seq_len, i_h, H, V, chunk, v_start, BT, BV)

        v_to_end = (v_c.to(tl.float32) * (dt_c * tl.exp(last - log_decay))[:, None]).to(v_c.dtype)
        state = state * tl.exp(last) + tl.dot(tl.trans(k_c), v_to_end, input_precision=DOT_PRECISION)
    if STORE_HT:
        tl.store(ht + state_offsets, state, mask=state_ok)


@triton.jit
def _ssd_bwd_dq_kernel(
    q, k, v, dt, A, h0, do, dq, q_dot_dq_inter, chunk_states, cu_seqlens, chunk_offsets, T, total_tokens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dq_t = sum_{s <= t} exp(b_t - b_s) dt_s (do_t . v_s) k_s + exp(b_t) S_prev do_t, per key block.

    Also writes this key block's share of q_t . dq~_t^inter (summed over blocks by the dv kernel)
    and of the state each chunk starts from, S_prev."""
    i_k, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len = _sequence_span(cu_seqlens, i_n, T, IS_VARLEN)
    first_chunk = _chunk_base(chunk_offsets, i_n, T, BT, IS_VARLEN)
    a_h = tl.load(A + i_h).to(tl.float32)
    k_start = i_k * BK
    cols_k = k_start + tl.arange(0, BK)
    v_start = 0
    cols_v = tl.arange(0, BV)
    k_ok, v_ok = cols_k < K, cols_v < V
    state_tile = cols_k[:, None] * V + cols_v[None, :]
    state_ok = k_ok[:, None] & v_ok[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0 + i_nh.to(tl.int64) * K * V + state_tile, mask=state_ok, other=0.0).to(tl.float32)
    for chunk in range(0, tl.cdiv(seq_len, BT)):
        tokens = chunk * BT + tl.arange(0, BT)
        row_ok = tokens < seq_len
        rows = bos + tokens
        q_c = _load_tokens(q, bos, seq_len, i_h, H, K, chunk, k_start, BT, BK)
        k_c = _load_tokens(k, bos, seq_len, i_h, H, K, chunk, k_start, BT, BK)
        v_c = _load_tokens(v, bos, seq_len, i_h, H, V, chunk, v_start, BT, BV)
        do_c = _load_tokens(do, bos, seq_len, i_h, H, V, chunk, v_start, BT, BV)
        dt_c, log_decay, last = _chunk_decay(dt, rows, row_ok, i_h, a_h, H, BT)

        do_v = tl.dot(do_c, tl.trans(v_c), input_precision=DOT_PRECISION)
        do_v = do_v * _causal_decay(log_decay, BT) * dt_c[None, :]
        dq_c = tl.dot(do_v.to(k_c.dtype), k_c, input_precision=DOT_PRECISION)
        dq_inter = tl.exp(log_decay)[:, None] * tl.dot(do_c, tl.trans(state.to(do_c.dtype)), input_precision=DOT_PRECISION)
        _store_tokens(dq, dq_c + dq_inter, bos, seq_len, i_h, H, K, chunk, k_start, BT, BK)
        partial = tl.sum(dq_inter * q_c.to(tl.float32), axis=1)
        tl.store(q_dot_dq_inter + i_k * total_tokens * H + rows * H + i_h, partial, mask=row_ok)

        chunk_state = chunk_states + ((first_chunk + chunk) * H + i_h) * K * V + state_tile
        tl.store(chunk_state, state.to(chunk_states.dtype.element_ty), mask=state_ok)
        v_to_end = (v_c.to(tl.float32) * (dt_c * tl.exp(last - log_decay))[:, None]).to(v_c.dtype)
        state = state * tl.exp(last) + tl.dot(tl.trans(k_c), v_to_end, input_precision=DOT_PRECISION)


@triton.jit
def _ssd_bwd_dk_kernel(
    q, k, v, dt, A, do, dht, dk, k_dot_dk_inter, dh0, cu_seqlens, T, total_tokens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Backward walk over chunks carrying the key-block rows of dS = dL/d(state at the chunk's end):

    dk~_s = sum_{t >= s} exp(b_t - b_s) (do_t . v_s) q_t + exp(b_last - b_s) dS v_s,   dk = dt dk~
    dS   <- exp(b_last) dS + sum_t exp(b_t) q_t do_t^T

    Also writes this key block's share of k_s . dk~_s^inter = exp(b_last - b_s) k_s . (dS v_s).
    """
    i_k, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len = _sequence_span(cu_seqlens, i_n, T, IS_VARLEN)
    a_h = tl.load(A + i_h).to(tl.float32)
    k_start = i_k * BK
    cols_k = k_start + tl.arange(0, BK)
    v_start = 0
    cols_v = tl.arange(0, BV)
    k_ok, v_ok = cols_k < K, cols_v < V
    state_offsets = i_nh.to(tl.int64) * K * V + cols_k[:, None] * V + cols_v[None, :]
    state_ok = k_ok[:, None] & v_ok[None, :]
    d_state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        d_state += tl.load(dht + state_offsets, mask=state_ok, other=0.0).to(tl.float32)
    for chunk in range(tl.cdiv(seq_len, BT) - 1, -1, -1):
        tokens = chunk * BT + tl.arange(0, BT)
        row_ok = tokens < seq_len
        rows = bos + tokens
        q_c = _load_tokens(q, bos, seq_len, i_h, H, K, chunk, k_start, BT, BK)
        k_c = _load_tokens(k, bos, seq_len, i_h, H, K, chunk, k_start, BT, BK)
        v_c = _load_tokens(v, bos, seq_len, i_h, H, V, chunk, v_start, BT, BV)
        do_c = _load_tokens(do, bos, seq_len, i_h, H, V, chunk, v_start, BT, BV)
        dt_c, log_decay, last = _chunk_decay(dt, rows, row_ok, i_h, a_h, H, BT)

        do_v = tl.dot(do_c, tl.trans(v_c), input_precision=DOT_PRECISION) * _causal_decay(log_decay, BT)
        dk_folded = tl.dot(tl.trans(do_v.to(q_c.dtype)), q_c, input_precision=DOT_PRECISION)
        dk_inter = tl.exp(last - log_decay)[:, None] * tl.dot(v_c, tl.trans(d_state.to(v_c.dtype)), input_precision=DOT_PRECISION)
        _store_tokens(dk, (dk_folded + dk_inter) * dt_c[:, None], bos, seq_len, i_h, H, K, chunk, k_start, BT, BK)
        partial = tl.sum(dk_inter * k_c.to(tl.float32), axis=1)
        tl.store(k_dot_dk_inter + i_k * total_tokens * H + rows * H + i_h, partial, mask=row_ok)

        do_decayed = (do_c.to(tl.float32) * tl.exp(log_decay)[:, None]).to(do_c.dtype)
        d_state = d_state * tl.exp(last) + tl.dot(tl.trans(q_c), do_decayed, input_precision=DOT_PRECISION)
    if STORE_DH0:
        tl.store(dh0 + state_offsets, d_state, mask=state_ok)


@triton.jit
def _ssd_bwd_dv_kernel(
    q, k, v, dt, A, D, do, dht, q_dot_dq_inter, k_dot_dk_inter, chunk_states,
    dv, d_dt, d_A, d_D, cu_seqlens, chunk_offsets, T, total_tokens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NUM_K_BLOCKS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_DHT: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Backward walk over chunks carrying the value-block columns of dS:

    dv_s = sum_{t >= s} exp(b_t - b_s) dt_s (q_t . k_s) do_t + exp(b_last - b_s) dt_s dS^T k_s + D do_s
    and this value block's shares of ddt, dA and dD: every term of the decay gradient (module note)
    is a sum over value columns, so the blocks' shares add up (in torch).
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len = _sequence_span(cu_seqlens, i_n, T, IS_VARLEN)
    first_chunk = _chunk_base(chunk_offsets, i_n, T, BT, IS_VARLEN)
    a_h = tl.load(A + i_h).to(tl.float32)
    skip = 0.0
    if HAS_D:
        skip = tl.load(D + i_h).to(tl.float32)
    k_start = 0
    cols_k = tl.arange(0, BK)
    v_start = i_v * BV
    cols_v = v_start + tl.arange(0, BV)
    k_ok, v_ok = cols_k < K, cols_v < V
    state_tile = cols_k[:, None] * V + cols_v[None, :]
    state_ok = k_ok[:, None] & v_ok[None, :]
    d_state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        d_state += tl.load(dht + i_nh.to(tl.int64) * K * V + state_tile, mask=state_ok, other=0.0).to(tl.float32)
    t_index = tl.arange(0, BT)
    d_A_total = tl.zeros([BT], dtype=tl.float32)
    d_D_total = tl.zeros([BT], dtype=tl.float32)
    # The dq and dk kernels' q . dq~^inter and k . dk~^inter are counted once, by the first value block.
    first_block = tl.where(i_v == 0, 1.0, 0.0)
    for chunk in range(tl.cdiv(seq_len, BT) - 1, -1, -1):
        tokens = chunk * BT + t_index
        row_ok = tokens < seq_len
        rows = bos + tokens
        q_c = _load_tokens(q, bos, seq_len, i_h, H, K, chunk, k_start, BT, BK)
        k_c = _load_tokens(k, bos, seq_len, i_h, H, K, chunk, k_start, BT, BK)
        v_c = _load_tokens(v, bos, seq_len, i_h, H, V, chunk, v_start, BT, BV)
        do_c = _load_tokens(do, bos, seq_len, i_h, H, V, chunk, v_start, BT, BV)
        dt_c, log_decay, last = _chunk_decay(dt, rows, row_ok, i_h, a_h, H, BT)
        to_end = tl.exp(last - log_decay)
        d_state_low = d_state.to(k_c.dtype)

        scores = tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PRECISION) * _causal_decay(log_decay, BT)
        dv_c = tl.dot(tl.trans((scores * dt_c[None, :]).to(do_c.dtype)), do_c, input_precision=DOT_PRECISION)
        dv_c += (dt_c * to_end)[:, None] * tl.dot(k_c, d_state_low, input_precision=DOT_PRECISION)
        dv_c += skip * do_c.to(tl.float32)
        _store_tokens(dv, dv_c, bos, seq_len, i_h, H, V, chunk, v_start, BT, BV)

        # Decay gradient, this value block's share; pair_terms[t, s] = C_ts / dt_s.
        do_v = tl.dot(do_c, tl.trans(v_c), input_precision=DOT_PRECISION)
        pair_terms = scores * do_v
        q_inter = tl.zeros([BT], dtype=tl.float32)
        k_inter = tl.zeros([BT], dtype=tl.float32)
        for i_k in tl.static_range(NUM_K_BLOCKS):
            shares = i_k * total_tokens * H + rows * H + i_h
            q_inter += first_block * tl.load(q_dot_dq_inter + shares, mask=row_ok, other=0.0)
            k_inter += first_block * tl.load(k_dot_dk_inter + shares, mask=row_ok, other=0.0)
        k_dot_dk = tl.sum(pair_terms, axis=0) + k_inter
        pair_terms = pair_terms * dt_c[None, :]
        chunk_state = chunk_states + ((first_chunk + chunk) * H + i_h) * K * V + state_tile
        carried = tl.exp(last) * tl.sum(tl.sum(d_state * tl.load(chunk_state, mask=state_ok, other=0.0), axis=1), axis=0)
        later = tl.sum(pair_terms, axis=1) - tl.sum(pair_terms, axis=0) + q_inter  # summed over t >= j
        earlier = dt_c * k_inter  # summed over s < j
        d_a = tl.sum(later, axis=0) - tl.cumsum(later, axis=0) + later
        d_a += tl.cumsum(earlier, axis=0) - earlier + carried
        tl.store(d_dt + i_v * total_tokens * H + rows * H + i_h, k_dot_dk + a_h * d_a, mask=row_ok)
        d_A_total += d_a * dt_c
        d_D_total += tl.sum(tl.where(t_index[:, None] == t_index[None, :], do_v, 0.0), axis=1)

        do_decayed = (do_c.to(tl.float32) * tl.exp(log_decay)[:, None]).to(do_c.dtype)
        d_state = d_state * tl.exp(last) + tl.dot(tl.trans(q_c), do_decayed, input_precision=DOT_PRECISION)
    tl.store(d_A + i_v * tl.num_programs(1) + i_nh, tl.sum(d_A_total, axis=0))
    tl.store(d_D + i_v * tl.num_programs(1) + i_nh, tl.sum(d_D_total, axis=0))


def _block(size, cap=None):
    """Power-of-two tile width >= 16 (tl.dot's minimum) covering `size`, optionally capped."""
    width = max(16, triton.next_power_of_2(size))
    return width if cap is None else min(width, cap)


def _dot_precision(dtype):
    # float32 inputs get true fp32 products; tf32 would cost ~3e-4 relative error.
    return "ieee" if dtype == torch.float32 else "tf32"


def forward_buffers(q, k, v, dt, A, D, initial_state, output_final_state, cu_seqlens):
    """What both forward kernels take: contiguous inputs (dt, A, D and the initial state in fp32),
    the output o (v's dtype) and the fp32 final-state buffer (or None); plus the number of sequences."""
    num_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    inputs = (q.contiguous(), k.contiguous(), v.contiguous(), dt.float().contiguous(), A.float().contiguous(),
              None if D is None else D.float().contiguous(),
              None if initial_state is None else initial_state.float().contiguous())
    v = inputs[2]
    o = torch.empty_like(v)
    ht = (torch.empty(num_seqs, q.shape[2], q.shape[3], v.shape[-1], dtype=torch.float32, device=q.device)
          if output_final_state else None)
    return inputs, o, ht, num_seqs


def _chunk_offsets(cu_seqlens, batch, length, chunk_size):
    """(first chunk of each sequence in the per-chunk state buffer, or None when not packed; total chunks)."""
    if cu_seqlens is None:
        return None, batch * triton.cdiv(length, chunk_size)
    num_chunks = (cu_seqlens[1:] - cu_seqlens[:-1] + chunk_size - 1) // chunk_size
    offsets = torch.cumsum(num_chunks, 0) - num_chunks
    return offsets.to(torch.int32), int(num_chunks.sum())


def _ssd_forward(q, k, v, dt, A, D, initial_state, output_final_state, cu_seqlens, chunk_size):
    B, T, H, K = q.shape
    V = v.shape[-1]
    (q, k, v, dt32, A32, D32, h0), o, ht, num_seqs = forward_buffers(
        q, k, v, dt, A, D, initial_state, output_final_state, cu_seqlens)
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
    return o, ht


def _ssd_backward(q, k, v, dt, A, D, h0, cu_seqlens, chunk_size, do, dht):
    """Gradients of every input in its own dtype (None for an absent D or initial state)."""
    dt_dtype, A_dtype, D_dtype, h0_dtype = dt.dtype, A.dtype, None if D is None else D.dtype, \
        None if h0 is None else h0.dtype
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dt, A = dt.float().contiguous(), A.float().contiguous()
    D = None if D is None else D.float().contiguous()
    h0 = None if h0 is None else h0.float().contiguous()
    B, T, H, K = q.shape
    V = v.shape[-1]
    num_seqs = B if cu_seqlens is None else cu_seqlens.numel() - 1
    do = do.contiguous()
    dht = None if dht is None else dht.float().contiguous()
    BT, settings = chunk_size, KERNEL_SETTINGS
    BK_split, BK, BV = _block(K, cap=settings["bwd_block_k"]), _block(K), _block(V)
    num_k_blocks = triton.cdiv(K, BK_split)
    chunk_offsets, total_chunks = _chunk_offsets(cu_seqlens, B, T, BT)
    # Placeholders for absent optional tensors: never read (their constexpr flag is off).
    unused = dt
    packed = dict(cu_seqlens=cu_seqlens if cu_seqlens is not None else unused,
                  chunk_offsets=chunk_offsets if chunk_offsets is not None else unused)
    common = dict(H=H, K=K, V=V, BT=BT, IS_VARLEN=cu_seqlens is not None,
                  DOT_PRECISION=_dot_precision(q.dtype), num_stages=settings["num_stages"])

    dq = torch.empty_like(q)
    q_dot_dq_inter = torch.empty(num_k_blocks, B * T, H, dtype=torch.float32, device=q.device)
    chunk_states = torch.empty(total_chunks, H, K, V, dtype=torch.float32, device=q.device)
    _ssd_bwd_dq_kernel[(num_k_blocks, num_seqs * H)](
        q, k, v, dt, A, h0 if h0 is not None else unused, do, dq, q_dot_dq_inter, chunk_states,
        T=T, total_tokens=B * T, BK=BK_split, BV=BV, HAS_H0=h0 is not None,
        num_warps=settings["dq_warps"], **packed, **common,
    )
    dk = torch.empty_like(k)
    k_dot_dk_inter = torch.empty_like(q_dot_dq_inter)
    dh0 = torch.empty_like(h0) if h0 is not None else None
    _ssd_bwd_dk_kernel[(num_k_blocks, num_seqs * H)](
        q, k, v, dt, A, do, dht if dht is not None else unused, dk, k_dot_dk_inter,
        dh0 if dh0 is not None else unused,
        cu_seqlens=packed["cu_seqlens"], T=T, total_tokens=B * T, BK=BK_split, BV=BV,
        HAS_DHT=dht is not None, STORE_DH0=dh0 is not None, num_warps=settings["dk_warps"], **common,
    )
    dv = torch.empty_like(v)
    BV_dv = _block(V, cap=settings["dv_block_v"])
    num_v_blocks = triton.cdiv(V, BV_dv)
    d_dt = torch.empty(num_v_blocks, B * T, H, dtype=torch.float32, device=q.device)
    d_A = torch.empty(num_v_blocks, num_seqs, H, dtype=torch.float32, device=q.device)
    d_D = torch.empty(num_v_blocks, num_seqs, H, dtype=torch.float32, device=q.device)
    _ssd_bwd_dv_kernel[(num_v_blocks, num_seqs * H)](
        q, k, v, dt, A, D if D is not None else unused, do, dht if dht is not None else unused,
        q_dot_dq_inter, k_dot_dk_inter, chunk_states, dv, d_dt, d_A, d_D,
        T=T, total_tokens=B * T, BK=BK, BV=BV_dv, NUM_K_BLOCKS=num_k_blocks,
        HAS_D=D is not None, HAS_DHT=dht is not None, num_warps=settings["dv_warps"], **packed, **common,
    )
    return (dq, dk, dv, d_dt.sum(0).view(B, T, H).to(dt_dtype), d_A.sum((0, 1)).to(A_dtype),
            None if D is None else d_D.sum((0, 1)).to(D_dtype), None if dh0 is None else dh0.to(h0_dtype))


# ---- the kernels as torch custom ops (see gdn.chunk): torch.compile calls them from its graph without
# tracing into them; an absent optional tensor is an empty one.
def _absent(t):
    return t is None or t.numel() == 0


def _present(t):
    return None if _absent(t) else t


@torch.library.custom_op("oryx::ssd_chunk_forward", mutates_args=())
def ssd_chunk_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                      D: torch.Tensor | None, initial_state: torch.Tensor | None, output_final_state: bool,
                      cu_seqlens: torch.Tensor | None, chunk_size: int) -> list[torch.Tensor]:
    """[o, final state (empty unless asked for)]."""
    o, ht = _ssd_forward(q, k, v, dt, A, _present(D), _present(initial_state), output_final_state,
                         _present(cu_seqlens), chunk_size)
    return [o, ht if ht is not None else q.new_empty(0, dtype=torch.float32)]


@ssd_chunk_forward.register_fake
def _(q, k, v, dt, A, D, initial_state, output_final_state, cu_seqlens, chunk_size):
    num_seqs = q.shape[0] if _absent(cu_seqlens) else cu_seqlens.shape[0] - 1
    f32 = dict(dtype=torch.float32, device=q.device)
    ht = q.new_empty(num_seqs, q.shape[2], q.shape[3], v.shape[-1], **f32) if output_final_state else \
        q.new_empty(0, **f32)
    return [torch.empty_like(v, memory_format=torch.contiguous_format), ht]


@torch.library.custom_op("oryx::ssd_chunk_backward", mutates_args=())
def ssd_chunk_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                       D: torch.Tensor | None, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                       chunk_size: int, do: torch.Tensor, dht: torch.Tensor | None) -> list[torch.Tensor]:
    """[dq, dk, dv, d_dt, d_A, d_D (empty without D), d_initial_state (empty without one)]."""
    grads = _ssd_backward(q, k, v, dt, A, _present(D), _present(initial_state), _present(cu_seqlens), chunk_size,
                          do, _present(dht))
    return [g if g is not None else q.new_empty(0, dtype=torch.float32) for g in grads]


@ssd_chunk_backward.register_fake
def _(q, k, v, dt, A, D, initial_state, cu_seqlens, chunk_size, do, dht):
    like = lambda t: q.new_empty(0, dtype=torch.float32) if _absent(t) else torch.empty_like(  # noqa: E731
        t, memory_format=torch.contiguous_format)
    return [like(q), like(k), like(v), like(dt), like(A), like(D), like(initial_state)]


def _ssd_setup_context(ctx, inputs, output):
    q, k, v, dt, A, D, initial_state, _, cu_seqlens, chunk_size = inputs
    ctx.chunk_size = chunk_size
    ctx.save_for_backward(q, k, v, dt, A, D, initial_state, cu_seqlens)


def _ssd_autograd_backward(ctx, grads):
    q, k, v, dt, A, D, initial_state, cu_seqlens = ctx.saved_tensors
    do, dht = grads
    do = torch.zeros_like(v) if do is None else do
    dq, dk, dv, d_dt, d_A, d_D, dh0 = ssd_chunk_backward(q, k, v, dt, A, D, initial_state, cu_seqlens,
                                                          ctx.chunk_size, do, _present(dht))
    return (dq, dk, dv, d_dt, d_A, _present(d_D), _present(dh0), None, None, None)


ssd_chunk_forward.register_autograd(_ssd_autograd_backward, setup_context=_ssd_setup_context)


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
    o, ht = ssd_chunk_forward(q, k, v, dt, A, D, initial_state, output_final_state, cu_seqlens, chunk_size)
    return o, ht if output_final_state else None
