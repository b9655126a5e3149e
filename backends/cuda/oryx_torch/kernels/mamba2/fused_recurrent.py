"""Token-by-token Mamba-2 (SSD) in Triton, for inference: a time loop inside the kernel, and a
single decode step that updates the state in place and can append to a KV cache in the same launch.

    S_t = exp(A_h dt_t) S_{t-1} + dt_t k_t v_t^T ;   o_t = S_t^T q_t + D_h v_t

Each program owns a [K, BV] slice of one (sequence, head) state in registers (fp32).
"""
import torch
import triton
import triton.language as tl

from ._inputs import check_ssd_inputs
from .chunk import _block, _sequence_span, forward_buffers


@triton.jit
def _ssd_token_update(state, q_t, k_t, v_t, dt_t, a_h, skip):
    """One recurrence step on a register state [BK, BV]; returns (new state, output [BV])."""
    state = state * tl.exp(a_h * dt_t) + (dt_t * k_t)[:, None] * v_t[None, :]
    return state, tl.sum(state * q_t[:, None], axis=0) + skip * v_t


@triton.jit
def _ssd_fused_recurrent_kernel(
    q, k, v, dt, A, D, h0, o, ht, cu_seqlens, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_D: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len = _sequence_span(cu_seqlens, i_n, T, IS_VARLEN)
    a_h = tl.load(A + i_h).to(tl.float32)
    skip = 0.0
    if HAS_D:
        skip = tl.load(D + i_h).to(tl.float32)
    cols_k = tl.arange(0, BK)
    cols_v = i_v * BV + tl.arange(0, BV)
    k_ok, v_ok = cols_k < K, cols_v < V
    state_offsets = i_nh.to(tl.int64) * K * V + cols_k[:, None] * V + cols_v[None, :]
    state_ok = k_ok[:, None] & v_ok[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0 + state_offsets, mask=state_ok, other=0.0).to(tl.float32)
    for t in range(0, seq_len):
        row = bos + t
        q_t = tl.load(q + (row * H + i_h) * K + cols_k, mask=k_ok, other=0.0).to(tl.float32)
        k_t = tl.load(k + (row * H + i_h) * K + cols_k, mask=k_ok, other=0.0).to(tl.float32)
        v_t = tl.load(v + (row * H + i_h) * V + cols_v, mask=v_ok, other=0.0).to(tl.float32)
        dt_t = tl.load(dt + row * H + i_h).to(tl.float32)
        state, o_t = _ssd_token_update(state, q_t, k_t, v_t, dt_t, a_h, skip)
        tl.store(o + (row * H + i_h) * V + cols_v, o_t.to(o.dtype.element_ty), mask=v_ok)
    if STORE_HT:
        tl.store(ht + state_offsets, state, mask=state_ok)


def fused_recurrent_ssd(q, k, v, dt, A, D=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Forward only; same arguments and results as naive_recurrent_ssd (o in v.dtype, fp32 states)."""
    check_ssd_inputs(q, k, v, dt, A, D, initial_state, cu_seqlens)
    _, T, H, K = q.shape
    V = v.shape[-1]
    (q, k, v, dt, A, D, h0), o, ht, num_seqs = forward_buffers(
        q, k, v, dt, A, D, initial_state, output_final_state, cu_seqlens)
    BK, BV = _block(K), _block(V, cap=32)
    _ssd_fused_recurrent_kernel[(triton.cdiv(V, BV), num_seqs * H)](
        q, k, v, dt, A, D if D is not None else A, h0 if h0 is not None else o, o,
        ht if ht is not None else o, cu_seqlens if cu_seqlens is not None else dt, T,
        H=H, K=K, V=V, BK=BK, BV=BV,
        HAS_D=D is not None, HAS_H0=h0 is not None, STORE_HT=ht is not None, IS_VARLEN=cu_seqlens is not None,
    )
    return o, ht


@triton.jit
def _ssd_decode_kernel(
    q, k, v, dt, A, D, state, o,
    k_cache, v_cache, k_append, v_append, cache_pos,
    cache_b_stride, cache_h_stride, cache_t_stride, vcache_b_stride, vcache_h_stride, vcache_t_stride,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HC: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
    HAS_D: tl.constexpr, HAS_CACHE: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    a_h = tl.load(A + i_h).to(tl.float32)
    skip = 0.0
    if HAS_D:
        skip = tl.load(D + i_h).to(tl.float32)
    cols_k = tl.arange(0, BK)
    cols_v = i_v * BV + tl.arange(0, BV)
    k_ok, v_ok = cols_k < K, cols_v < V
    state_offsets = i_bh.to(tl.int64) * K * V + cols_k[:, None] * V + cols_v[None, :]
    state_ok = k_ok[:, None] & v_ok[None, :]
    s = tl.load(state + state_offsets, mask=state_ok, other=0.0)
    q_t = tl.load(q + i_bh * K + cols_k, mask=k_ok, other=0.0).to(tl.float32)
    k_t = tl.load(k + i_bh * K + cols_k, mask=k_ok, other=0.0).to(tl.float32)
    v_t = tl.load(v + i_bh * V + cols_v, mask=v_ok, other=0.0).to(tl.float32)
    dt_t = tl.load(dt + i_bh).to(tl.float32)
    s, o_t = _ssd_token_update(s, q_t, k_t, v_t, dt_t, a_h, skip)
    tl.store(state + state_offsets, s, mask=state_ok)
    tl.store(o + i_bh * V + cols_v, o_t.to(o.dtype.element_ty), mask=v_ok)
    if HAS_CACHE:
        # The first value block of each cache head copies this token's key and value into the cache.
        if (i_v == 0) & (i_h < HC):
            pos = tl.load(cache_pos + i_b).to(tl.int64)
            cols_dk = tl.arange(0, BDK)
            cols_dv = tl.arange(0, BDV)
            row = i_b * HC + i_h
            key = tl.load(k_append + row * DK + cols_dk, mask=cols_dk < DK)
            value = tl.load(v_append + row * DV + cols_dv, mask=cols_dv < DV)
            k_slot = k_cache + i_b.to(tl.int64) * cache_b_stride + i_h * cache_h_stride + pos * cache_t_stride
            v_slot = v_cache + i_b.to(tl.int64) * vcache_b_stride + i_h * vcache_h_stride + pos * vcache_t_stride
            tl.store(k_slot + cols_dk, key.to(k_cache.dtype.element_ty), mask=cols_dk < DK)
            tl.store(v_slot + cols_dv, value.to(v_cache.dtype.element_ty), mask=cols_dv < DV)


def _check_decode_inputs(q, k, v, dt, A, D, state):
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, K], got shape {tuple(q.shape)}")
    B, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 3 or v.shape[:2] != (B, H):
        raise ValueError(f"v must be [B, H, V] = [{B}, {H}, V], got {tuple(v.shape)}")
    if dt.shape != (B, H):
        raise ValueError(f"dt must be [B, H] = [{B}, {H}], got {tuple(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"A must be [H] = [{H}], got {tuple(A.shape)}")
    if D is not None and D.shape != (H,):
        raise ValueError(f"D must be [H] = [{H}], got {tuple(D.shape)}")
    V = v.shape[-1]
    if state.shape != (B, H, K, V) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(
            f"state must be a contiguous float32 [B, H, K, V] = [{B}, {H}, {K}, {V}] tensor, "
            f"got {state.dtype} {tuple(state.shape)}"
        )


def _check_cache(name, cache, append, batch, heads):
    if cache.dim() != 4 or cache.shape[0] != batch or cache.shape[1] > heads or cache.stride(-1) != 1:
        raise ValueError(
            f"{name} must be [B={batch}, Hc <= {heads}, Tmax, D] with a contiguous last axis, got {tuple(cache.shape)}"
        )
    expected = (batch, cache.shape[1], cache.shape[3])
    if append.shape != expected:
        raise ValueError(f"the token appended to {name} must be {list(expected)}, got {tuple(append.shape)}")


def ssd_decode_step(q, k, v, dt, A, D, state, k_cache=None, v_cache=None, k_append=None, v_append=None, cache_pos=None):
    """One token per sequence: updates `state` IN PLACE and returns o [B, H, V] in v.dtype.

    q, k: [B, H, K]; v: [B, H, V]; dt: [B, H] (softplus'd); A: [H]; D: [H] or None;
    state: contiguous float32 [B, H, K, V].
    KV-cache append (optional, in the same launch): k_cache [B, Hc, Tmax, Dk] and v_cache
    [B, Hc, Tmax, Dv] (Hc <= H, last axis contiguous) receive k_append [B, Hc, Dk] and v_append
    [B, Hc, Dv] (default: this step's k and v) at position cache_pos[b] (int tensor [B]).
    """
    _check_decode_inputs(q, k, v, dt, A, D, state)
    B, H, K = q.shape
    V = v.shape[-1]
    has_cache = k_cache is not None or v_cache is not None
    if has_cache:
        if k_cache is None or v_cache is None or cache_pos is None:
            raise ValueError("KV append needs k_cache, v_cache and cache_pos together")
        k_append = k if k_append is None else k_append
        v_append = v if v_append is None else v_append
        _check_cache("k_cache", k_cache, k_append, B, H)
        _check_cache("v_cache", v_cache, v_append, B, H)
        if v_cache.shape[1] != k_cache.shape[1]:
            raise ValueError(f"k_cache and v_cache must have the same heads, got {k_cache.shape[1]} and {v_cache.shape[1]}")
        if cache_pos.shape != (B,) or cache_pos.is_floating_point():
            raise ValueError(f"cache_pos must be an integer tensor [B] = [{B}], got {cache_pos.dtype} {tuple(cache_pos.shape)}")
        k_append, v_append = k_append.contiguous(), v_append.contiguous()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dt, A = dt.float().contiguous(), A.float().contiguous()
    D = None if D is None else D.float().contiguous()
    if not has_cache:
        k_append = v_append = None
    return ssd_decode(q, k, v, dt, A, D, state, k_cache, v_cache, k_append, v_append, cache_pos)


# The decode step as a torch custom op that declares what it writes (the state, and the KV cache when one is
# given), so torch.compile can call it from a captured decode graph without tracing into the kernel.
@torch.library.custom_op("oryx::ssd_decode_step", mutates_args=("state", "k_cache", "v_cache"))
def ssd_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
               D: torch.Tensor | None, state: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
               k_append: torch.Tensor | None, v_append: torch.Tensor | None,
               cache_pos: torch.Tensor | None) -> torch.Tensor:
    """Checked, contiguous, fp32-gated arguments of ssd_decode_step -> o [B, H, V]."""
    B, H, K = q.shape
    V = v.shape[-1]
    has_cache = k_cache is not None
    o = torch.empty_like(v)
    BK, BV = _block(K), _block(V, cap=32)
    cache_args = (k_cache, v_cache, k_append, v_append, cache_pos) if has_cache else (o, o, o, o, o)
    cache_strides = (*k_cache.stride()[:3], *v_cache.stride()[:3]) if has_cache else (0,) * 6
    HC, DK, DV = (k_cache.shape[1], k_cache.shape[3], v_cache.shape[3]) if has_cache else (1, 1, 1)
    _ssd_decode_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, v, dt, A, D if D is not None else A, state, o, *cache_args, *cache_strides,
        H=H, K=K, V=V, BK=BK, BV=BV, HC=HC, DK=DK, DV=DV,
        BDK=triton.next_power_of_2(DK), BDV=triton.next_power_of_2(DV),
        HAS_D=D is not None, HAS_CACHE=has_cache,
    )
    return o


@ssd_decode.register_fake
def _(q, k, v, dt, A, D, state, k_cache, v_cache, k_append, v_append, cache_pos):
    return torch.empty_like(v)
