"""A decode token's fused Triton kernels: a layer's mixer between its input projections and o_proj in one or
two, and the residual stream's norms and the MLP's activation one each.

recurrent_token_step, one program per (sequence, key/value head), or with `split_heads` per (sequence, query
head), each then updating its own copy of the group's state: the short convs of the recurrent query, the key
and the value (the new input enters each conv window, which shifts in place), their activation, for GDN the L2
norms, the gates (decay e^g with g = -e^{A_log} softplus(a + dt_bias), write strength beta = sigmoid(b)) and the
delta-rule update of the state, shared by the group's query heads and written to each of their copies,
    S <- e^g S;  S <- S + k (beta (v - S^T k))^T;  o_h = scale S^T q_h,
for Mamba-2 (dt = softplus(a + dt_bias), g = -e^{A_log} dt)
    S <- e^g S + dt k v^T;  o_h = S^T q_h + D v,
the gated RMSNorm of each query head's readout, and (optionally) the key, rotated by RoPE, and the value appended
to the KV cache at the sequence's position. Given `modes` and `o_attn`, the rows whose mode is attention take the
readout the attention kernel wrote instead of the recurrence's before the norm. The modes share the key and value
(sharing `kv` or `qkv`), or, given the recurrence's own key and value convs and windows (sharing `kv-proj`), only
the projections: the recurrence then reads those convs of the same k and v inputs, the KV cache the attention
convs', and every window the step reads (attention's and the recurrence's) shifts once.

attention_token_step, programs per (sequence, key/value head): the same convs of the key and value (windows left
alone unless `finish`), RoPE on the key and the group's queries, the KV-cache append, and softmax attention of the
group's queries over the cache slots before the sequence's position plus the current token, in blocks with a running
maximum (a cache of more than 64 slots split between programs, attention_split, whose partial results the last of
them to finish combines, ATTENTION_COMBINE_IN_LAST_SPLIT, or a second kernel); with `finish` (no recurrence in the
step) also the window shift and the gated norm, otherwise the readout goes to recurrent_token_step.

Both read the projections as row views of the fused projection matmul's output (any row stride) and compute in
fp32 whatever the model's dtype; the state is fp32 [B, H, K, V], one equal copy per query head.
"""
from __future__ import annotations

import functools
import inspect

import torch
import triton
import triton.language as tl

from . import pdl
from .gdn._triton_compat import patch_interpreter_scalar_index
from .pdl import wait_for_previous

patch_interpreter_scalar_index()


@triton.jit
def _conv_token(x_row, win, weight, bias, b, C, channels, mask, W: tl.constexpr, BW: tl.constexpr,
                HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """One token of a depthwise causal conv at `channels` of sequence b: (output fp32, window rows [BW, BC] as
    loaded, the input rounded to the window's dtype). The window holds the last W-1 inputs, oldest first."""
    taps = tl.arange(0, BW)
    history = (taps < W - 1)[:, None] & mask[None, :]
    rows = tl.load(win + b * (W - 1) * C + taps[:, None] * C + channels[None, :], mask=history, other=0.0)
    x = tl.load(x_row + channels, mask=mask, other=0.0).to(win.dtype.element_ty)
    w = tl.load(weight + channels[None, :] * W + taps[:, None], mask=history, other=0.0).to(tl.float32)
    w_last = tl.load(weight + channels * W + (W - 1), mask=mask, other=0.0).to(tl.float32)
    out = tl.sum(rows.to(tl.float32) * w, axis=0) + x.to(tl.float32) * w_last
    if HAS_BIAS:
        out += tl.load(bias + channels, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        out = out * tl.sigmoid(out)
    return out, rows, x


@triton.jit
def _shift_window(win, b, C, channels, mask, rows, x, W: tl.constexpr, BW: tl.constexpr):
    """Writes the window's rows 1.. one row up and x into its last row (call after a barrier: other threads
    of the program may still be reading the rows this overwrites)."""
    taps = tl.arange(0, BW)
    base = win + b * (W - 1) * C
    keep = ((taps >= 1) & (taps < W - 1))[:, None] & mask[None, :]
    tl.store(base + (taps[:, None] - 1) * C + channels[None, :], rows, mask=keep)
    tl.store(base + (W - 2) * C + channels, x, mask=mask)


@triton.jit
def _rope(x, x_rot, cos, sin, row, idx, mask):
    """Rotate-half RoPE: x * [c, c] + x[(i + D/2) % D] * [-s, s] (tables [.., D] as rope_tables makes them)."""
    c = tl.load(cos + row + idx, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin + row + idx, mask=mask, other=0.0).to(tl.float32)
    return x * c + x_rot * s


@triton.jit
def _gate_row(gate_row, idx, mask, OUTPUT_GATE: tl.constexpr):
    """The output gate's pre-activation g of one head (fp32; zeros when the layer has no output gate)."""
    if OUTPUT_GATE:
        return tl.load(gate_row + idx, mask=mask, other=0.0).to(tl.float32)
    return tl.zeros(idx.shape, tl.float32)


@triton.jit
def _gated_norm(o, g, norm_w, eps, idx, mask, DV: tl.constexpr, OUTPUT_NORM: tl.constexpr,
                OUTPUT_GATE: tl.constexpr, GATE_BEFORE_NORM: tl.constexpr):
    """reference.gated_out_norm per head: RMSNorm(o) w SiLU(g), or RMSNorm(o SiLU(g)) w, or the parts present
    (g from _gate_row)."""
    if OUTPUT_GATE:
        gate = g * tl.sigmoid(g)
        if GATE_BEFORE_NORM or not OUTPUT_NORM:
            o = o * gate
    if OUTPUT_NORM:
        o = o * (1.0 / tl.sqrt(tl.sum(o * o) / DV + eps))
        o = o * tl.load(norm_w + idx, mask=mask, other=0.0).to(tl.float32)
        if OUTPUT_GATE and not GATE_BEFORE_NORM:
            o = o * gate
    return o


@triton.jit
def _recurrent_token_kernel(
        q_in, q_stride, k_in, k_stride, v_in, v_stride, a_in, a_stride, b_in, b_stride, gate_in, gate_stride,
        conv_q_w, conv_q_b, conv_k_w, conv_k_b, conv_v_w, conv_v_b, win_q, win_k, win_v,
        A_log, dt_bias, D_skip, state, scale, l2_eps, norm_w, norm_eps,
        k_cache, v_cache, kc_sb, kc_sh, kc_st, vc_sb, vc_sh, vc_st, position, cos, sin, rope_stride,
        modes, o_attn, out, arrivals, conv_k_rec_w, conv_k_rec_b, conv_v_rec_w, conv_v_rec_b, win_k_rec, win_v_rec,
        H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, W: tl.constexpr,
        BD: tl.constexpr, BDV: tl.constexpr, BW: tl.constexpr,
        CONV_BIAS: tl.constexpr, SILU: tl.constexpr, OUTPUT_NORM: tl.constexpr, OUTPUT_GATE: tl.constexpr,
        GATE_BEFORE_NORM: tl.constexpr, APPEND_KV: tl.constexpr, ROPE: tl.constexpr, MIXED: tl.constexpr,
        SSD: tl.constexpr, SPLIT_HEADS: tl.constexpr, REC_KV_CONVS: tl.constexpr, PDL: tl.constexpr):
    # SPLIT_HEADS: one program per query head of the group (program_id 2), each updating the shared state itself
    # and writing its own copy and readout; the last of the group to arrive (arrivals[b, j], an atomic count
    # that it resets) shifts the shared k and v windows (with REC_KV_CONVS also k_rec and v_rec), which every
    # program of the group reads first.
    # REC_KV_CONVS (sharing kv-proj): the KV-cache append takes the attention convs' k and v (conv_k, conv_v over
    # win_k, win_v), the recurrence its own convs' of the same inputs (conv_*_rec over win_*_rec). The attention
    # windows shift here too, also without an append (the KV cache dropped, or appended by the attention kernel,
    # which leaves them to this one): every token advances every window the cache keeps, as OryxMixer.step does.
    b, j, first_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d_idx = tl.arange(0, BD)
    v_idx = tl.arange(0, BDV)
    d_ok, v_ok = d_idx < D, v_idx < DV
    # the group's state copies are equal: update one, write it to each (split: each program its own copy). It is
    # loaded before waiting for the previous kernel (pdl.py): only this kernel, a step earlier, writes it.
    copies = state + (b * H + j * G).to(tl.int64) * D * DV
    tile = d_idx[:, None] * DV + v_idx[None, :]
    tile_ok = d_ok[:, None] & v_ok[None, :]
    S = tl.load(copies + first_head * D * DV + tile, mask=tile_ok, other=0.0)
    wait_for_previous(PDL)
    # every load of the previous kernels' outputs goes out here, together: loads issued after the cache stores,
    # the barrier or the atomic below would wait for them
    a = tl.load(a_in + b * a_stride + j).to(tl.float32) + tl.load(dt_bias + j).to(tl.float32)
    if not SSD:
        b_gate = tl.load(b_in + b * b_stride + j).to(tl.float32)
    attention_row = False
    if MIXED:
        attention_row = tl.load(modes + b) != 0
    k_ch = j * D + d_idx
    v_ch = j * DV + v_idx
    k, k_rows, k_x = _conv_token(k_in + b * k_stride, win_k, conv_k_w, conv_k_b, b, HKV * D, k_ch, d_ok, W, BW,
                                 CONV_BIAS, SILU)
    v, v_rows, v_x = _conv_token(v_in + b * v_stride, win_v, conv_v_w, conv_v_b, b, HKV * DV, v_ch, v_ok, W, BW,
                                 CONV_BIAS, SILU)
    if SPLIT_HEADS:  # this program's one query head: its query, gate and attention readout
        own_head = j * G + first_head
        own_q, own_q_rows, own_q_x = _conv_token(q_in + b * q_stride, win_q, conv_q_w, conv_q_b, b, H * D,
                                                 own_head * D + d_idx, d_ok, W, BW, CONV_BIAS, SILU)
        own_g = _gate_row(gate_in + b * gate_stride + own_head * DV, v_idx, v_ok, OUTPUT_GATE)
        if MIXED:
            own_attended = tl.load(o_attn + (b * H + own_head) * DV + v_idx, mask=v_ok, other=0.0).to(tl.float32)
    if APPEND_KV:
        pos = tl.load(position + b).to(tl.int64)
        key = k
        if ROPE:
            rot_ch = j * D + (d_idx + D // 2) % D
            k_rot, _r, _x = _conv_token(k_in + b * k_stride, win_k, conv_k_w, conv_k_b, b, HKV * D, rot_ch, d_ok,
                                        W, BW, CONV_BIAS, SILU)
            key = _rope(k, k_rot, cos, sin, b * rope_stride, d_idx, d_ok)
        tl.store(k_cache + b * kc_sb + j * kc_sh + pos * kc_st + d_idx, key.to(k_cache.dtype.element_ty),
                 mask=d_ok & (first_head == 0))
        tl.store(v_cache + b * vc_sb + j * vc_sh + pos * vc_st + v_idx, v.to(v_cache.dtype.element_ty),
                 mask=v_ok & (first_head == 0))
    if REC_KV_CONVS:  # from here on k and v are the recurrence's; k_rows, k_x, v_rows, v_x stay the attention's
        k, k_rec_rows, k_rec_x = _conv_token(k_in + b * k_stride, win_k_rec, conv_k_rec_w, conv_k_rec_b, b, HKV * D,
                                             k_ch, d_ok, W, BW, CONV_BIAS, SILU)
        v, v_rec_rows, v_rec_x = _conv_token(v_in + b * v_stride, win_v_rec, conv_v_rec_w, conv_v_rec_b, b, HKV * DV,
                                             v_ch, v_ok, W, BW, CONV_BIAS, SILU)
    # gates of this key/value head: GDN's decay and write strength, or Mamba-2's step size dt
    softplus_a = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(tl.minimum(a, 20.0))))
    decay = tl.exp(-tl.exp(tl.load(A_log + j).to(tl.float32)) * softplus_a)
    S = S * decay
    if SSD:
        S = S + (softplus_a * k)[:, None] * v[None, :]
        skip = tl.load(D_skip + j).to(tl.float32) * v
    else:
        beta = tl.sigmoid(b_gate)
        k = k / tl.sqrt(tl.sum(k * k) + l2_eps)
        correction = beta * (v - tl.sum(S * k[:, None], axis=0))
        S = S + k[:, None] * correction[None, :]
    tl.debug_barrier()  # every thread has read the k and v windows before they shift
    if SPLIT_HEADS:
        arrived = tl.atomic_add(arrivals + b * HKV + j, 1, sem="acq_rel")
        if arrived == G - 1:  # the group's other programs have read the windows
            _shift_window(win_k, b, HKV * D, k_ch, d_ok, k_rows, k_x, W, BW)
            _shift_window(win_v, b, HKV * DV, v_ch, v_ok, v_rows, v_x, W, BW)
            if REC_KV_CONVS:
                _shift_window(win_k_rec, b, HKV * D, k_ch, d_ok, k_rec_rows, k_rec_x, W, BW)
                _shift_window(win_v_rec, b, HKV * DV, v_ch, v_ok, v_rec_rows, v_rec_x, W, BW)
            tl.store(arrivals + b * HKV + j, 0)
    else:
        _shift_window(win_k, b, HKV * D, k_ch, d_ok, k_rows, k_x, W, BW)
        _shift_window(win_v, b, HKV * DV, v_ch, v_ok, v_rows, v_x, W, BW)
        if REC_KV_CONVS:
            _shift_window(win_k_rec, b, HKV * D, k_ch, d_ok, k_rec_rows, k_rec_x, W, BW)
            _shift_window(win_v_rec, b, HKV * DV, v_ch, v_ok, v_rec_rows, v_rec_x, W, BW)
    for head in tl.static_range(1 if SPLIT_HEADS else G):
        i = first_head + head
        h = j * G + i
        q_ch = h * D + d_idx
        if SPLIT_HEADS:
            q, q_rows, q_x, g = own_q, own_q_rows, own_q_x, own_g
        else:
            q, q_rows, q_x = _conv_token(q_in + b * q_stride, win_q, conv_q_w, conv_q_b, b, H * D, q_ch, d_ok, W,
                                         BW, CONV_BIAS, SILU)
            g = _gate_row(gate_in + b * gate_stride + h * DV, v_idx, v_ok, OUTPUT_GATE)
        if SSD:
            o = tl.sum(S * q[:, None], axis=0) + skip
        else:
            q = q / tl.sqrt(tl.sum(q * q) + l2_eps)
            o = scale * tl.sum(S * q[:, None], axis=0)
        tl.store(copies + i * D * DV + tile, S, mask=tile_ok)
        if MIXED:
            if SPLIT_HEADS:
                attended = own_attended
            else:
                attended = tl.load(o_attn + (b * H + h) * DV + v_idx, mask=v_ok, other=0.0).to(tl.float32)
            o = tl.where(attention_row, attended, o)
        o = _gated_norm(o, g, norm_w, norm_eps, v_idx, v_ok, DV, OUTPUT_NORM, OUTPUT_GATE, GATE_BEFORE_NORM)
        tl.store(out + (b * H + h) * DV + v_idx, o.to(out.dtype.element_ty), mask=v_ok)
        tl.debug_barrier()
        _shift_window(win_q, b, H * D, q_ch, d_ok, q_rows, q_x, W, BW)


@triton.jit
def _cache_block(k_base, v_base, kc_st, vc_st, start, hi, t_idx, d_idx, d_ok, v_idx, v_ok):
    """The cached keys [BT, BD] and values [BT, BDV] of slots start + t_idx, and which of them are below hi."""
    t = start + t_idx
    t_ok = t < hi
    keys = tl.load(k_base + t[:, None] * kc_st + d_idx[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    values = tl.load(v_base + t[:, None] * vc_st + v_idx[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0)
    return keys, values, t_ok


@triton.jit
def _attend_block(q, keys, values, t_ok, m, total, acc, DOT_PRECISION: tl.constexpr):
    """One block of slots folded into a running softmax: q [BG, BD] (scaled, the cache's dtype), keys [BT, BD] and
    values [BT, BDV] with t_ok [BT] marking real slots; m, total [BG] and acc [BG, BDV] fp32. Returns the three."""
    scores = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION)                      # [BG, BT]
    scores = tl.where(t_ok[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    p = tl.exp(scores - m_new[:, None])
    alpha = tl.exp(m - m_new)
    acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=DOT_PRECISION)
    return m_new, total * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _attention_token_kernel(
        q_in, q_stride, k_in, k_stride, v_in, v_stride, gate_in, gate_stride,
        conv_k_w, conv_k_b, conv_v_w, conv_v_b, win_k, win_v,
        k_cache, v_cache, kc_sb, kc_sh, kc_st, vc_sb, vc_sh, vc_st, position, cos, sin, rope_stride, scale,
        norm_w, norm_eps, out, part_max, part_sum, part_acc, arrivals,
        H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, W: tl.constexpr,
        BD: tl.constexpr, BDV: tl.constexpr, BW: tl.constexpr, BG: tl.constexpr, BT: tl.constexpr,
        CONV_BIAS: tl.constexpr, SILU: tl.constexpr, ROPE: tl.constexpr, WRITE_WINDOWS: tl.constexpr,
        FINISH: tl.constexpr, OUTPUT_NORM: tl.constexpr, OUTPUT_GATE: tl.constexpr, GATE_BEFORE_NORM: tl.constexpr,
        DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr, SPLITS: tl.constexpr, COMBINE_LAST: tl.constexpr,
        PDL: tl.constexpr):
    # program (b, j, s): with SPLIT > 0 it attends over slots [s SPLIT, (s + 1) SPLIT) only and writes its running
    # maximum, sum and weighted values; with COMBINE_LAST the group's last split to arrive (arrivals[b, j], an
    # atomic count that it resets) combines them into the readout, else _attention_combine_kernel does. Split 0
    # also owns the current token, the cache append and the window shift. The other splits compute the key and
    # value too (one code path) but use neither: they may read the windows while split 0 shifts them.
    b, j, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first = s == 0
    d_idx = tl.arange(0, BD)
    v_idx = tl.arange(0, BDV)
    g_idx = tl.arange(0, BG)
    t_idx = tl.arange(0, BT)
    d_ok, v_ok, g_ok = d_idx < D, v_idx < DV, g_idx < G
    k_ch = j * D + d_idx
    v_ch = j * DV + v_idx
    # the position (written by a torch op between steps) and the cached slots below it (written a step or more
    # earlier) are no output of the previous kernel, so they may load before waiting for it (pdl.py)
    pos = tl.load(position + b).to(tl.int64)
    k_base = k_cache + b * kc_sb + j * kc_sh
    v_base = v_cache + b * vc_sb + j * vc_sh
    lo = 0
    hi = pos
    if SPLIT > 0:
        lo = s * SPLIT
        hi = tl.minimum(pos, lo + SPLIT)
    if SPLIT == BT:  # a split is one block of slots: load it now, attend to it after the wait
        keys, values, t_ok = _cache_block(k_base, v_base, kc_st, vc_st, lo, hi, t_idx, d_idx, d_ok, v_idx, v_ok)
    wait_for_previous(PDL)
    k, k_rows, k_x = _conv_token(k_in + b * k_stride, win_k, conv_k_w, conv_k_b, b, HKV * D, k_ch, d_ok, W, BW,
                                 CONV_BIAS, SILU)
    v, v_rows, v_x = _conv_token(v_in + b * v_stride, win_v, conv_v_w, conv_v_b, b, HKV * DV, v_ch, v_ok, W, BW,
                                 CONV_BIAS, SILU)
    # the group's queries [BG, BD]
    q_cols = (j * G + g_idx)[:, None] * D
    qg_ok = g_ok[:, None] & d_ok[None, :]
    q = tl.load(q_in + b * q_stride + q_cols + d_idx[None, :], mask=qg_ok, other=0.0).to(tl.float32)
    if ROPE:
        rot = (d_idx + D // 2) % D
        k_rot, _r, _x = _conv_token(k_in + b * k_stride, win_k, conv_k_w, conv_k_b, b, HKV * D, j * D + rot, d_ok,
                                    W, BW, CONV_BIAS, SILU)
        k = _rope(k, k_rot, cos, sin, b * rope_stride, d_idx, d_ok)
        q_rot = tl.load(q_in + b * q_stride + q_cols + rot[None, :], mask=qg_ok, other=0.0).to(tl.float32)
        q = _rope(q, q_rot, cos, sin, b * rope_stride, d_idx[None, :], d_ok[None, :])
    key = k.to(k_cache.dtype.element_ty)
    value = v.to(v_cache.dtype.element_ty)
    tl.store(k_cache + b * kc_sb + j * kc_sh + pos * kc_st + d_idx, key, mask=d_ok & first)
    tl.store(v_cache + b * vc_sb + j * vc_sh + pos * vc_st + v_idx, value, mask=v_ok & first)
    q = (q * scale).to(k_cache.dtype.element_ty)
    # the current token's key and value, as the cache holds them, start split 0's running softmax
    m = tl.where(first, tl.sum(q.to(tl.float32) * key.to(tl.float32)[None, :], axis=1), float("-inf"))
    total = tl.where(first, tl.full([BG], 1.0, tl.float32), 0.0)
    acc = tl.where(first, tl.zeros([BG, BDV], tl.float32) + value.to(tl.float32)[None, :], 0.0)
    if SPLIT == BT:
        if lo < hi:  # a split past the position has no slot (its running maximum stays -inf)
            m, total, acc = _attend_block(q, keys, values, t_ok, m, total, acc, DOT_PRECISION)
    else:
        for start in range(lo, hi, BT):
            keys, values, t_ok = _cache_block(k_base, v_base, kc_st, vc_st, start, hi, t_idx, d_idx, d_ok, v_idx,
                                              v_ok)
            m, total, acc = _attend_block(q, keys, values, t_ok, m, total, acc, DOT_PRECISION)
    if WRITE_WINDOWS:
        tl.debug_barrier()
        _shift_window(win_k, b, HKV * D, k_ch, d_ok & first, k_rows, k_x, W, BW)
        _shift_window(win_v, b, HKV * DV, v_ch, v_ok & first, v_rows, v_x, W, BW)
    cols = (j * G + g_idx)[:, None] * DV + v_idx[None, :]
    o_ok = g_ok[:, None] & v_ok[None, :]
    last = True
    if SPLIT > 0:
        rows = (b * H + j * G + g_idx) * SPLITS + s                                          # [BG] in [B, H, S]
        tl.store(part_max + rows, m, mask=g_ok)
        tl.store(part_sum + rows, total, mask=g_ok)
        tl.store(part_acc + rows[:, None] * DV + v_idx[None, :], acc, mask=o_ok)
        last = False
        if COMBINE_LAST:
            tl.debug_barrier()  # every thread's partial stores precede the release below
            arrived = tl.atomic_add(arrivals + b * HKV + j, 1, sem="acq_rel")
            last = arrived == SPLITS - 1
            if last:  # the group's other splits have stored theirs: combine in two passes over the splits
                rows = (b * H + j * G + g_idx) * SPLITS
                m = tl.full([BG], float("-inf"), tl.float32)
                for split in tl.static_range(SPLITS):
                    m = tl.maximum(m, tl.load(part_max + rows + split, mask=g_ok, other=float("-inf")))
                m = tl.where(m == float("-inf"), 0.0, m)  # rows past the group's heads: no weight is used
                total = tl.zeros([BG], tl.float32)
                acc = tl.zeros([BG, BDV], tl.float32)
                for split in tl.static_range(SPLITS):
                    weight = tl.exp(tl.load(part_max + rows + split, mask=g_ok, other=float("-inf")) - m)
                    total += weight * tl.load(part_sum + rows + split, mask=g_ok, other=0.0)
                    acc += weight[:, None] * tl.load(part_acc + (rows + split)[:, None] * DV + v_idx[None, :],
                                                     mask=o_ok, other=0.0)
                total = tl.where(g_ok, total, 1.0)
                tl.store(arrivals + b * HKV + j, 0)
    if last:
        o = acc / total[:, None]                                                              # [BG, BDV]
        if FINISH:
            if OUTPUT_GATE:
                g = tl.load(gate_in + b * gate_stride + cols, mask=o_ok, other=0.0).to(tl.float32)
                gate = g * tl.sigmoid(g)
                if GATE_BEFORE_NORM or not OUTPUT_NORM:
                    o = o * gate
            if OUTPUT_NORM:
                o = o * (1.0 / tl.sqrt(tl.sum(o * o, axis=1) / DV + norm_eps))[:, None]
                o = o * tl.load(norm_w + v_idx, mask=v_ok, other=0.0).to(tl.float32)[None, :]
                if OUTPUT_GATE and not GATE_BEFORE_NORM:
                    o = o * gate
        tl.store(out + b * H * DV + cols, o.to(out.dtype.element_ty), mask=o_ok)


@triton.jit
def _attention_combine_kernel(part_max, part_sum, part_acc, gate_in, gate_stride, norm_w, norm_eps, out,
                              H: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, SPLITS: tl.constexpr,
                              BS: tl.constexpr, FINISH: tl.constexpr, OUTPUT_NORM: tl.constexpr,
                              OUTPUT_GATE: tl.constexpr, GATE_BEFORE_NORM: tl.constexpr, PDL: tl.constexpr):
    """One (sequence, query head): the splits' partial softmaxes into one readout (gated-normed with FINISH)."""
    b, h = tl.program_id(0), tl.program_id(1)
    wait_for_previous(PDL)
    s_idx = tl.arange(0, BS)
    v_idx = tl.arange(0, BDV)
    s_ok, v_ok = s_idx < SPLITS, v_idx < DV
    rows = (b * H + h) * SPLITS + s_idx
    m = tl.load(part_max + rows, mask=s_ok, other=float("-inf"))
    weight = tl.exp(m - tl.max(m, axis=0))                                                    # 0 for empty splits
    total = tl.sum(tl.load(part_sum + rows, mask=s_ok, other=0.0) * weight, axis=0)
    acc = tl.load(part_acc + rows[:, None] * DV + v_idx[None, :], mask=s_ok[:, None] & v_ok[None, :], other=0.0)
    o = tl.sum(acc * weight[:, None], axis=0) / total
    if FINISH:
        g = _gate_row(gate_in + b * gate_stride + h * DV, v_idx, v_ok, OUTPUT_GATE)
        o = _gated_norm(o, g, norm_w, norm_eps, v_idx, v_ok, DV, OUTPUT_NORM, OUTPUT_GATE, GATE_BEFORE_NORM)
    tl.store(out + (b * H + h) * DV + v_idx, o.to(out.dtype.element_ty), mask=v_ok)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _cache_strides(k_cache, v_cache):
    if k_cache is None:
        return (0,) * 6
    return (*k_cache.stride()[:3], *v_cache.stride()[:3])


def _rope_arguments(cos, sin, dummy):
    """(cos, sin, row stride): tables [1, D] serve every sequence (stride 0), [B, D] one row each."""
    if cos is None:
        return dummy, dummy, 0
    return cos, sin, (cos.stride(0) if cos.shape[0] > 1 else 0)


def split_heads_applies(batch: int, n_heads: int, device: torch.device) -> bool:
    """Whether recurrent_token_step runs one program per query head: while those programs fit about twice over on
    the SMs; past that the per-key/value-head launch already fills them, and the split would only read each state
    copy separately (the group size times the state reads) for no added parallelism."""
    return batch * n_heads <= 2 * _sm_count(device)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


_ARRIVALS: dict = {}


def _arrivals(n: int, device: torch.device) -> torch.Tensor:
    """A zeroed int32 count per (sequence, key/value head) that recurrent_token_step's split-heads launch and
    attention_token_step's split launch use and leave zeroed again; one buffer per device, shared by every layer
    (their kernels run one after another)."""
    counts = _ARRIVALS.get(device)
    if counts is None or counts.numel() < n:
        counts = _ARRIVALS[device] = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
    return counts


# As torch custom ops declaring what they write, so that a torch.compile'd decode step calls them from its graph.
def recurrent_token_step(*args, **kwargs) -> torch.Tensor:
    """_recurrent_token_step with the arguments after out_dtype optional (split_heads False, the others None).
    The op always gets every argument: torch 2.11's dispatcher drops trailing arguments left at their defaults,
    and then cannot find the mutated win_k_rec and win_v_rec it must mark."""
    arguments = {**_RECURRENT_TOKEN_DEFAULTS, **_RECURRENT_TOKEN_ARGUMENTS.bind_partial(*args, **kwargs).arguments}
    return _recurrent_token_step(*_RECURRENT_TOKEN_ARGUMENTS.bind(**arguments).args)


def _recurrent_token_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                          b: torch.Tensor | None, gate: torch.Tensor | None, conv_q_w: torch.Tensor,
                          conv_q_b: torch.Tensor | None, conv_k_w: torch.Tensor, conv_k_b: torch.Tensor | None,
                          conv_v_w: torch.Tensor, conv_v_b: torch.Tensor | None, silu: bool, win_q: torch.Tensor,
                          win_k: torch.Tensor, win_v: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
                          D_skip: torch.Tensor | None, state: torch.Tensor, scale: float, l2_eps: float,
                          norm_w: torch.Tensor | None, norm_eps: float, gate_before_norm: bool,
                          k_cache: torch.Tensor | None, v_cache: torch.Tensor | None, position: torch.Tensor,
                          cos: torch.Tensor | None, sin: torch.Tensor | None, modes: torch.Tensor | None,
                          o_attn: torch.Tensor | None, out_dtype: torch.dtype, split_heads: bool,
                          conv_k_rec_w: torch.Tensor | None, conv_k_rec_b: torch.Tensor | None,
                          conv_v_rec_w: torch.Tensor | None, conv_v_rec_b: torch.Tensor | None,
                          win_k_rec: torch.Tensor | None, win_v_rec: torch.Tensor | None) -> torch.Tensor:
    """One recurrent decode token of every sequence (module docstring): GDN, or Mamba-2 when D_skip is given
    (then `a` is dt_proj's output, b is unused, and o = S^T q + D v without scale or L2 norms). q, k, v, a, b, gate
    are the projections [B, *] (rows of any stride, last axis contiguous); windows [B, W-1, C] and state
    [B, H, K, V] change in place, the KV cache too when given (keys RoPE'd with cos/sin [1 or B, K] when given);
    modes [B] bool with o_attn [B, H, V]: the rows whose readout is the attention's. Returns the gated-normed
    readout [B, H * V] in out_dtype. `split_heads`: one program per query head instead of per key/value head
    (each repeats the group's state update; more programs at small batches). With conv_k_rec_w (sharing
    kv-proj; then conv_v_rec_w, win_k_rec and win_v_rec too, the biases as conv_k_b) the recurrence reads k and
    v through those convs and windows, the KV cache through conv_k/conv_v, and all four windows shift."""
    B, H, K, V = state.shape
    HKV, W = win_k.shape[2] // K, conv_k_w.shape[1]
    out = torch.empty(B, H * V, dtype=out_dtype, device=q.device)
    dummy = state
    cos, sin, rope_stride = _rope_arguments(cos, sin, dummy)
    b = a if b is None else b
    rec_kv = conv_k_rec_w is not None
    if rec_kv and (conv_v_rec_w is None or win_k_rec is None or win_v_rec is None
                   or (conv_k_rec_b is None) != (conv_k_b is None) or (conv_v_rec_b is None) != (conv_k_b is None)):
        raise ValueError("recurrent_token_step: the recurrence's own convs need conv_k_rec_w, conv_v_rec_w, "
                         "win_k_rec and win_v_rec, with biases where conv_k has one")
    rec_args = (conv_k_rec_w, conv_k_rec_b, conv_v_rec_w, conv_v_rec_b, win_k_rec, win_v_rec)
    with_pdl = pdl.applies(q.device)
    _recurrent_token_kernel[(B, HKV, H // HKV if split_heads else 1)](
        q, q.stride(0), k, k.stride(0), v, v.stride(0), a, a.stride(0), b, b.stride(0),
        dummy if gate is None else gate, 0 if gate is None else gate.stride(0),
        conv_q_w, dummy if conv_q_b is None else conv_q_b, conv_k_w, dummy if conv_k_b is None else conv_k_b,
        conv_v_w, dummy if conv_v_b is None else conv_v_b, win_q, win_k, win_v,
        A_log, dt_bias, dummy if D_skip is None else D_skip, state, scale, l2_eps,
        dummy if norm_w is None else norm_w, norm_eps,
        dummy if k_cache is None else k_cache, dummy if v_cache is None else v_cache, *_cache_strides(k_cache, v_cache),
        position, cos, sin, rope_stride, dummy if modes is None else modes.view(torch.uint8),
        dummy if o_attn is None else o_attn, out, _arrivals(B * HKV, q.device) if split_heads else dummy,
        *(dummy if t is None else t for t in rec_args),
        H=H, HKV=HKV, G=H // HKV, D=K, DV=V, W=W, BD=_pow2(K), BDV=_pow2(V), BW=_pow2(W),
        CONV_BIAS=conv_k_b is not None, SILU=silu, OUTPUT_NORM=norm_w is not None, OUTPUT_GATE=gate is not None,
        GATE_BEFORE_NORM=gate_before_norm, APPEND_KV=k_cache is not None, ROPE=cos is not dummy,
        MIXED=modes is not None, SSD=D_skip is not None, SPLIT_HEADS=split_heads, REC_KV_CONVS=rec_kv, PDL=with_pdl,
        num_warps=8 if K * V >= 16384 else 4 if K * V >= 4096 else 2,  # the state tile stays in registers
        launch_pdl=with_pdl)
    return out


_recurrent_token_step = torch.library.custom_op(
    "oryx::recurrent_token_step", _recurrent_token_launch,
    mutates_args=("win_q", "win_k", "win_v", "state", "k_cache", "v_cache", "win_k_rec", "win_v_rec"))
_RECURRENT_TOKEN_ARGUMENTS = inspect.signature(_recurrent_token_launch)
_RECURRENT_TOKEN_DEFAULTS = dict(split_heads=False, conv_k_rec_w=None, conv_k_rec_b=None, conv_v_rec_w=None,
                                 conv_v_rec_b=None, win_k_rec=None, win_v_rec=None)


@_recurrent_token_step.register_fake
def _(q, k, v, a, b, gate, conv_q_w, conv_q_b, conv_k_w, conv_k_b, conv_v_w, conv_v_b, silu, win_q, win_k, win_v,
      A_log, dt_bias, D_skip, state, scale, l2_eps, norm_w, norm_eps, gate_before_norm, k_cache, v_cache, position,
      cos, sin, modes, o_attn, out_dtype, split_heads, conv_k_rec_w, conv_k_rec_b, conv_v_rec_w, conv_v_rec_b,
      win_k_rec, win_v_rec):
    B, H, _, V = state.shape
    return q.new_empty(B, H * V, dtype=out_dtype)


# A decode token's attention is split between programs, each over a run of cached slots, whose partial softmaxes
# are then combined: one program per (sequence, key/value head) would leave most of the GPU idle, the more so at
# batch 1. Caches of up to ATTENTION_SPLIT_FROM slots are cut into at most ATTENTION_SHORT_SPLITS runs of a
# multiple of 64 slots (64 up to 2,048 slots: a run of one block loads its keys and values before waiting on the
# previous kernel); longer caches into runs of ATTENTION_SPLIT slots.
ATTENTION_SPLIT_FROM, ATTENTION_SPLIT, ATTENTION_SHORT_SPLITS = 2048, 1024, 32
# Whether a split attention token's last split to finish combines the partial results (True) or a second launch
# does (False); read at every launch, and only for at most ATTENTION_SHORT_SPLITS splits (the last split reads
# every split's partials in an unrolled loop). Its ordering rests on the atomic count's release and acquire:
# tests/torch/test_decode_step_kernels.py's gpu tests replay it under a CUDA graph.
ATTENTION_COMBINE_IN_LAST_SPLIT = True


def attention_split(capacity: int) -> int:
    """Slots per program of attention_token_step for a cache of `capacity` slots (0: one program)."""
    if capacity > ATTENTION_SPLIT_FROM:
        return ATTENTION_SPLIT
    if capacity <= 64:
        return 0
    return 64 * -(-capacity // (64 * ATTENTION_SHORT_SPLITS))


@torch.library.custom_op("oryx::attention_token_step", mutates_args=("win_k", "win_v", "k_cache", "v_cache"))
def attention_token_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None,
                         conv_k_w: torch.Tensor, conv_k_b: torch.Tensor | None, conv_v_w: torch.Tensor,
                         conv_v_b: torch.Tensor | None, silu: bool, win_k: torch.Tensor, win_v: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor,
                         cos: torch.Tensor | None, sin: torch.Tensor | None, scale: float, n_heads: int,
                         finish: bool, norm_w: torch.Tensor | None, norm_eps: float, gate_before_norm: bool,
                         out_dtype: torch.dtype, split: int = 0) -> torch.Tensor:
    """One attention decode token of every sequence (module docstring): q [B, n_heads * K] (before RoPE), k, v the
    projections before their convs; the key (RoPE'd) and value land in the caches [B, Hkv, capacity, *] at
    position[b], the queries attend to slots < position[b] and the current token. With `finish` the windows shift
    and the result is the gated-normed readout [B, H * V] in out_dtype; without, the raw readout [B, H, V] fp32
    (recurrent_token_step's o_attn) and the windows stay. `split` > 0 (a multiple of 64): each program attends
    over that many slots and a second launch combines them, or with ATTENTION_COMBINE_IN_LAST_SPLIT the last to
    finish does (attention_split picks `split` by capacity)."""
    B, HKV, capacity, K = k_cache.shape
    V, H, W = v_cache.shape[3], n_heads, conv_k_w.shape[1]
    out = torch.empty(B, H * V, dtype=out_dtype, device=q.device) if finish else \
        torch.empty(B, H, V, dtype=torch.float32, device=q.device)
    dummy = k_cache
    cos, sin, rope_stride = _rope_arguments(cos, sin, dummy)
    block = 64 if K <= 64 else 32
    if split % 64:
        raise ValueError(f"split: expected a multiple of 64 slots, got {split}")
    splits = triton.cdiv(capacity, split) if split > 0 else 1
    if splits > 1:
        part_max = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(B, H, splits, V, dtype=torch.float32, device=q.device)
    else:
        part_max = part_sum = part_acc = out
    flags = dict(OUTPUT_NORM=norm_w is not None, OUTPUT_GATE=gate is not None, GATE_BEFORE_NORM=gate_before_norm)
    with_pdl = pdl.applies(q.device)
    gate_args = (dummy if gate is None else gate, 0 if gate is None else gate.stride(0))
    norm_args = (dummy if norm_w is None else norm_w, norm_eps)
    combine_last = 1 < splits <= ATTENTION_SHORT_SPLITS and ATTENTION_COMBINE_IN_LAST_SPLIT
    _attention_token_kernel[(B, HKV, splits)](
        q, q.stride(0), k, k.stride(0), v, v.stride(0), *gate_args,
        conv_k_w, dummy if conv_k_b is None else conv_k_b, conv_v_w, dummy if conv_v_b is None else conv_v_b,
        win_k, win_v, k_cache, v_cache, *_cache_strides(k_cache, v_cache), position, cos, sin, rope_stride, scale,
        *norm_args, out, part_max, part_sum, part_acc, _arrivals(B * HKV, q.device) if combine_last else dummy,
        H=H, HKV=HKV, G=H // HKV, D=K, DV=V, W=W, BD=_pow2(K), BDV=_pow2(V), BW=_pow2(W), BG=max(16, _pow2(H // HKV)),
        BT=block, CONV_BIAS=conv_k_b is not None, SILU=silu, ROPE=cos is not dummy, WRITE_WINDOWS=finish,
        FINISH=finish, DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        SPLIT=split if splits > 1 else 0, SPLITS=splits, COMBINE_LAST=combine_last, PDL=with_pdl, num_warps=4,
        launch_pdl=with_pdl, **flags)
    if splits > 1 and not combine_last:
        _attention_combine_kernel[(B, H)](part_max, part_sum, part_acc, *gate_args, *norm_args, out, H=H, DV=V,
                                          BDV=_pow2(V), SPLITS=splits, BS=_pow2(splits), FINISH=finish,
                                          PDL=with_pdl, num_warps=4, launch_pdl=with_pdl, **flags)
    return out


@attention_token_step.register_fake
def _(q, k, v, gate, conv_k_w, conv_k_b, conv_v_w, conv_v_b, silu, win_k, win_v, k_cache, v_cache, position, cos,
      sin, scale, n_heads, finish, norm_w, norm_eps, gate_before_norm, out_dtype, split=0):
    B, V = k_cache.shape[0], v_cache.shape[3]
    if finish:
        return q.new_empty(B, n_heads * V, dtype=out_dtype)
    return q.new_empty(B, n_heads, V, dtype=torch.float32)


# ----- the elementwise work between a decode step's matrix products -----
@triton.jit
def _rms_norm_kernel(x, residual, h_out, y, weight, eps, N, BN: tl.constexpr, ADD: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    wait_for_previous(PDL)
    idx = tl.arange(0, BN)
    ok = idx < N
    v = tl.load(x + row * N + idx, mask=ok, other=0.0).to(tl.float32)
    if ADD:  # the residual sum is rounded to the stream's dtype before the norm reads it, as torch's add is
        v = (v + tl.load(residual + row * N + idx, mask=ok, other=0.0).to(tl.float32)).to(h_out.dtype.element_ty)
        tl.store(h_out + row * N + idx, v, mask=ok)
        v = v.to(tl.float32)
    v = v * (1.0 / tl.sqrt(tl.sum(v * v) / N + eps)) * tl.load(weight + idx, mask=ok, other=0.0).to(tl.float32)
    tl.store(y + row * N + idx, v.to(y.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul_kernel(gate_up, out, F, BF: tl.constexpr, PDL: tl.constexpr):
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    wait_for_previous(PDL)
    idx = block * BF + tl.arange(0, BF)
    ok = idx < F
    gate = tl.load(gate_up + row * 2 * F + idx, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up + row * 2 * F + F + idx, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + row * F + idx, (gate * tl.sigmoid(gate) * up).to(out.dtype.element_ty), mask=ok)


@torch.library.custom_op("oryx::rms_norm_rows", mutates_args=())
def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of contiguous x [B, N] (model.RMSNorm's formula, fp32 inside) in one launch."""
    y = torch.empty_like(x)
    with_pdl = pdl.applies(x.device)
    _rms_norm_kernel[(x.shape[0],)](x, x, x, y, weight, eps, x.shape[1], BN=_pow2(x.shape[1]), ADD=False,
                                    PDL=with_pdl, num_warps=4, launch_pdl=with_pdl)
    return y


@rms_norm_rows.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("oryx::add_rms_norm_rows", mutates_args=())
def add_rms_norm_rows(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h = x + residual, RMSNorm(h)) for contiguous rows [B, N] in one launch."""
    h, y = torch.empty_like(x), torch.empty_like(x)
    with_pdl = pdl.applies(x.device)
    _rms_norm_kernel[(x.shape[0],)](x, residual, h, y, weight, eps, x.shape[1], BN=_pow2(x.shape[1]), ADD=True,
                                    PDL=with_pdl, num_warps=4, launch_pdl=with_pdl)
    return h, y


@add_rms_norm_rows.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("oryx::silu_mul", mutates_args=())
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for the fused [gate; up] projection's output [B, 2F] (contiguous) -> [B, F]."""
    B, F = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(B, F)
    block = min(1024, _pow2(F))
    with_pdl = pdl.applies(gate_up.device)
    _silu_mul_kernel[(B, triton.cdiv(F, block))](gate_up, out, F, BF=block, PDL=with_pdl, num_warps=4,
                                                 launch_pdl=with_pdl)
    return out


@silu_mul.register_fake
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
