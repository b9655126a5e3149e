"""Token-by-token Gated DeltaNet in Triton: the state stays in registers for the whole loop.

For decoding and short prompts, where the chunked kernels have too little work per chunk.
Inference only (no autograd): use chunk_gated_delta_rule to train.
One program owns state columns [c0, c0 + BV) of one (sequence, head) and walks its tokens:
    S <- e^{g} S;  S <- S + k (beta (v - S^T k))^T;  o = scale S^T q.
"""
import os

import torch
import triton
import triton.language as tl

from ._inputs import check_inputs, default_scale
from ._triton_compat import patch_interpreter_scalar_index

patch_interpreter_scalar_index()


@triton.jit
def _fused_recurrent_kernel(q, k, v, g, beta, o, h0, ht, cu_seqlens, scale, H,
                            k_cache, v_cache, k_append, v_append, cache_pos, HC,
                            kc_sb, kc_sh, kc_st, vc_sb, vc_sh, vc_st,
                            K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                            USE_L2NORM: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
                            APPEND_KV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                            BDK: tl.constexpr, BDV: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    k_idx = tl.arange(0, K)
    v_idx = i_v * BV + tl.arange(0, BV)
    state_offsets = (i_n * H + i_h).to(tl.int64) * K * V + k_idx[:, None] * V + v_idx[None, :]
    S = tl.zeros([K, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + state_offsets)
    for t in range(seq_len):
        token = (bos + t) * H + i_h
        q_t = tl.load(q + token * K + k_idx).to(tl.float32)
        k_t = tl.load(k + token * K + k_idx).to(tl.float32)
        v_t = tl.load(v + token * V + v_idx).to(tl.float32)
        g_t = tl.load(g + token).to(tl.float32)
        beta_t = tl.load(beta + token).to(tl.float32)
        if USE_L2NORM:
            q_t = q_t / tl.sqrt(tl.sum(q_t * q_t) + 1e-6)
            k_t = k_t / tl.sqrt(tl.sum(k_t * k_t) + 1e-6)
        S = S * tl.exp(g_t)
        correction = beta_t * (v_t - tl.sum(S * k_t[:, None], axis=0))
        S = S + k_t[:, None] * correction[None, :]
        o_t = scale * tl.sum(S * q_t[:, None], axis=0)
        tl.store(o + token * V + v_idx, o_t.to(o.dtype.element_ty))
    if STORE_FINAL:
        tl.store(ht + state_offsets, S)
    if APPEND_KV:
        # KV-cache append of the decode step, done by the first V block of the first HC heads
        if (i_v == 0) & (i_h < HC):
            pos = tl.load(cache_pos + i_n).to(tl.int64)
            dk_idx = tl.arange(0, BDK)
            k_row = tl.load(k_append + (i_n * HC + i_h) * DK + dk_idx, mask=dk_idx < DK)
            tl.store(k_cache + i_n * kc_sb + i_h * kc_sh + pos * kc_st + dk_idx, k_row, mask=dk_idx < DK)
            dv_idx = tl.arange(0, BDV)
            v_row = tl.load(v_append + (i_n * HC + i_h) * DV + dv_idx, mask=dv_idx < DV)
            tl.store(v_cache + i_n * vc_sb + i_h * vc_sh + pos * vc_st + dv_idx, v_row, mask=dv_idx < DV)


def _block_v(V, num_programs_without_split):
    # Small batches need the V split to fill the GPU; large ones prefer whole rows.
    return min(V, 32 if num_programs_without_split < 1024 else 64)


def _check_device(q, name):
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def _check_head_sizes(K, V):
    for name, d in (("K", K), ("V", V)):
        if d < 16 or d > 256 or d & (d - 1):
            raise ValueError(f"Triton GDN kernels need head size {name} a power of two in [16, 256], got {d}")


def _launch(q, k, v, g, beta, o, cu_seqlens, num_seqs, scale, initial_state, final_state,
            use_qk_l2norm, cache=None):
    """q, k [tokens, H, K]; v, o [tokens, H, V]; g, beta [tokens, H]; states [N, H, K, V]."""
    H, K = q.shape[-2:]
    V = v.shape[-1]
    BV = _block_v(V, num_seqs * H)
    if cache is None:
        dummy = q
        cache_args = (dummy, dummy, dummy, dummy, dummy, 0, 0, 0, 0, 0, 0, 0)
        dims = dict(APPEND_KV=False, DK=1, DV=1, BDK=1, BDV=1)
    else:
        k_cache, v_cache, k_append, v_append, cache_pos = cache
        HC, DK, DV = k_cache.shape[1], k_cache.shape[3], v_cache.shape[3]
        cache_args = (k_cache, v_cache, k_append, v_append, cache_pos, HC,
                      *k_cache.stride()[:3], *v_cache.stride()[:3])
        dims = dict(APPEND_KV=True, DK=DK, DV=DV, BDK=triton.next_power_of_2(DK), BDV=triton.next_power_of_2(DV))
    _fused_recurrent_kernel[(V // BV, num_seqs * H)](
        q, k, v, g, beta, o, initial_state, final_state, cu_seqlens, scale, H, *cache_args,
        K=K, V=V, BV=BV, USE_L2NORM=use_qk_l2norm, HAS_H0=initial_state is not None,
        STORE_FINAL=final_state is not None, **dims, num_warps=4 if K * BV >= 4096 else 2)


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                     use_qk_l2norm=False, cu_seqlens=None):
    """Gated DeltaNet by a loop over tokens inside one Triton kernel (no autograd).

    Same contract as chunk_gated_delta_rule: q, k [B, T, H, K]; v [B, T, H, V];
    g, beta [B, T, H]; initial_state [N, H, K, V] fp32; cu_seqlens packs N sequences
    (B == 1). use_qk_l2norm normalises q and k in the kernel (x / sqrt(|x|^2 + 1e-6)).
    Returns (o [B, T, H, V] in v.dtype, final_state [N, H, K, V] fp32 or None).
    """
    num_seqs = check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    _check_device(q, "fused_recurrent_gated_delta_rule")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta)):
        raise ValueError("fused_recurrent_gated_delta_rule has no backward; use chunk_gated_delta_rule to train")
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check_head_sizes(K, V)
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=q.device)
    flat = [t.reshape(B * T, *t.shape[2:]).contiguous() for t in (q, k, v, g, beta)]
    o = torch.empty(B * T, H, V, dtype=v.dtype, device=q.device)
    final = torch.empty(num_seqs, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    _launch(*flat, o, cu_seqlens, num_seqs, default_scale(scale, K), initial_state, final, use_qk_l2norm)
    return o.reshape(B, T, H, V), final


def gated_delta_rule_decode_step(q, k, v, g, beta, state, scale=None, use_qk_l2norm=False,
                                 k_cache=None, v_cache=None, k_append=None, v_append=None, cache_pos=None):
    """One decode token per sequence: updates `state` IN PLACE and returns o [B, H, V].

    q, k [B, H, K]; v [B, H, V]; g, beta [B, H]; state [B, H, K, V] fp32 contiguous.
    Optional KV-cache append in the same launch (all five or none): k_cache
    [B, Hc, Tmax, Dk] and v_cache [B, Hc, Tmax, Dv] (last dim contiguous) receive
    k_append [B, Hc, Dk] and v_append [B, Hc, Dv] at position cache_pos[b] (int [B]).
    The appended rows may be other tensors than k, v (e.g. attention-mode keys), so they
    are passed separately; Hc <= H. cache_pos must lie in [0, Tmax): it stays on the
    device and is not checked, which would cost a synchronisation per token.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, K] for a decode step, got shape {tuple(q.shape)}")
    B, H, K = q.shape
    if state.shape != (B, H, K, v.shape[-1]) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous fp32 [B, H, K, V] tensor, got {tuple(state.shape)} {state.dtype}")
    cache_args = (k_cache, v_cache, k_append, v_append, cache_pos)
    if any(a is not None for a in cache_args):
        cache = _check_cache(B, H, *cache_args)
    else:
        cache = None
    as_tokens = [t.unsqueeze(1) for t in (q, k, v, g, beta)]   # [B, 1, H, ...]: B sequences of one token
    check_inputs(*as_tokens, initial_state=state)
    _check_device(q, "gated_delta_rule_decode_step")
    _check_head_sizes(K, v.shape[-1])
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    return gdn_decode_step(q, k, v, g, beta, state, default_scale(scale, K), use_qk_l2norm,
                           *(cache if cache is not None else (None,) * 5))


# The decode step as a torch custom op that declares what it writes (the state, and the KV cache when one is
# given), so torch.compile can call it from a captured decode graph without tracing into the kernel.
@torch.library.custom_op("oryx::gdn_decode_step", mutates_args=("state", "k_cache", "v_cache"))
def gdn_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                    state: torch.Tensor, scale: float, use_qk_l2norm: bool, k_cache: torch.Tensor | None,
                    v_cache: torch.Tensor | None, k_append: torch.Tensor | None, v_append: torch.Tensor | None,
                    cache_pos: torch.Tensor | None) -> torch.Tensor:
    """Checked, contiguous arguments of gated_delta_rule_decode_step -> o [B, H, V]."""
    B = q.shape[0]
    o = torch.empty_like(v)
    cache = None if k_cache is None else (k_cache, v_cache, k_append, v_append, cache_pos)
    _launch(q, k, v, g, beta, o, _one_token_each(B, q.device), B, scale, state, state, use_qk_l2norm, cache)
    return o


@gdn_decode_step.register_fake
def _(q, k, v, g, beta, state, scale, use_qk_l2norm, k_cache, v_cache, k_append, v_append, cache_pos):
    return torch.empty_like(v)


_ONE_TOKEN_EACH: dict = {}


def _one_token_each(batch, device):
    """cu_seqlens of `batch` one-token sequences, made once per (batch, device): a fresh arange per token would be
    one more launch and more host time on every decode step. Not kept when made during a CUDA graph
    capture, where its memory would belong to the graph's pool (the decode runner warms up eagerly first)."""
    key = (batch, device)
    if key not in _ONE_TOKEN_EACH:
        seqlens = torch.arange(batch + 1, dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return seqlens
        _ONE_TOKEN_EACH[key] = seqlens
    return _ONE_TOKEN_EACH[key]


def _check_cache(B, H, k_cache, v_cache, k_append, v_append, cache_pos):
    names = ("k_cache", "v_cache", "k_append", "v_append", "cache_pos")
    missing = [n for n, a in zip(names, (k_cache, v_cache, k_append, v_append, cache_pos)) if a is None]
    if missing:
        raise ValueError(f"KV append needs all of {names}; missing {missing}")
    if k_cache.dim() != 4 or v_cache.dim() != 4 or k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[0] != B:
        raise ValueError(f"k_cache/v_cache must be [B, Hc, Tmax, D] with B={B}, got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    HC = k_cache.shape[1]
    if HC > H:
        raise ValueError(f"cache heads Hc={HC} exceed state heads H={H}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k_cache and v_cache need a contiguous last dimension")
    if tuple(k_append.shape) != (B, HC, k_cache.shape[3]) or tuple(v_append.shape) != (B, HC, v_cache.shape[3]):
        raise ValueError(f"k_append/v_append must be [B, Hc, Dk]/[B, Hc, Dv], got {tuple(k_append.shape)}, {tuple(v_append.shape)}")
    if k_append.dtype != k_cache.dtype or v_append.dtype != v_cache.dtype:
        raise ValueError("k_append/v_append must have the dtype of k_cache/v_cache")
    if cache_pos.shape != (B,) or cache_pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_pos must be an int32/int64 tensor [B], got {tuple(cache_pos.shape)} {cache_pos.dtype}")
    return k_cache, v_cache, k_append.contiguous(), v_append.contiguous(), cache_pos
