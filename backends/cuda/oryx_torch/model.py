"""The Oryx model in PyTorch: every layer runs each token with softmax attention or a linear
recurrence (Gated DeltaNet or Mamba-2), switching at any token, with keys, values, gate,
norm and output projection shared by both modes.

The float64 reference (`oryx_core/reference.py`) defines the function; this file computes
the same in fp32 or bf16 (recurrent state always fp32). Parameter names are the spec's
(`oryx_core.spec.parameter_specs`), so `state_dict()` keys are the checkpoint's names.

    model = OryxModel.from_checkpoint(path, dtype=torch.bfloat16, device="cuda")
    logits = model(tokens, modes)                # tokens [B, T]; modes bool [T] or [B, T], True = attention
    cache = model.make_cache(batch=1, capacity=4096)
    logits = model(prompt, modes, cache=cache)   # prefill: fills KV cache, conv windows, recurrent state
    logits = model.step(token, is_attention, cache)   # one token per sequence

Every token computes its key and value and updates the recurrence whatever its mode; only
attention-mode queries attend (attention.py); each token's output takes its own mode's
readout. Training uses the plain forward (no cache, no cu_seqlens).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from oryx_core.config import OryxConfig
from oryx_core.init import init_params
from oryx_core.reference import L2NORM_EPS
from oryx_core.weights import FLOAT_DTYPES, load_checkpoint, save_checkpoint

from . import cpu_linear, host_step
from .attention import AttentionPlan, apply_rope, decode_attention, plan_attention, rope_tables
from .cache import LayerCache, OryxCache
from .kernels.gdn import gated_delta_rule
from .kernels.gdn.chunk_torch import chunk_gated_delta_rule_grouped, chunk_layout, grouped_final_state
from .kernels.gdn.naive import gated_delta_rule_step_torch
from .kernels.mamba2 import ssd
from .kernels.mamba2.naive import ssd_step_torch

DTYPES = {name: getattr(torch, name) for name in FLOAT_DTYPES}  # the weight format's float dtypes as torch dtypes


# ----- small pieces -----
def fp32(x: torch.Tensor) -> torch.Tensor:
    """x as float32; x itself when it already is (a no-op .float() still costs an operator dispatch, which adds
    up over the hundreds of small tensors of a CPU decode step)."""
    return x if x.dtype == torch.float32 else x.float()


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, without an operator call when it already is."""
    return x if x.dtype == dtype else x.to(dtype)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w, computed in fp32, returned in x's dtype."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        if cpu_linear.applies(x):  # one fused operator for the five below (fp32 in, fp32 out)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = fp32(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return cast(y * fp32(self.weight), x.dtype)


def l2_normalize(x):
    if cpu_linear.applies(x):  # x·rsqrt(Σx² + ε) = rms_norm(x, eps=ε/d)·d^-½: one fused operator
        d = x.shape[-1]
        return F.rms_norm(x, (d,), _l2_weight(d), L2NORM_EPS / d)
    xf = fp32(x)
    return cast(xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + L2NORM_EPS), x.dtype)


@functools.cache
def _l2_weight(d: int) -> torch.Tensor:
    return torch.full((d,), d ** -0.5)


def concatenated_weights(cached, weights) -> tuple:
    """(key, the weights concatenated along their rows): `cached` while its key (each weight's storage, version,
    dtype and device) still matches, else a new concatenation. On CUDA a new one is complete before it is returned:
    the decode kernels launched as programmatic dependents (kernels/pdl.py) load their weights before waiting for
    the kernel before them, which could be this concatenation."""
    key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in weights)
    if cached is not None and cached[0] == key:
        return cached
    joined = torch.cat(list(weights)).detach()
    if joined.is_cuda and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing():
        torch.cuda.current_stream(joined.device).synchronize()
    return key, joined


def repeat_heads(x, group: int, dim: int):
    """Query head h reads key/value head h // group: repeat each kv head `group` times."""
    return x if group == 1 else x.repeat_interleave(group, dim=dim)


def causal_conv_taps(padded: torch.Tensor, weight: torch.Tensor, T: int) -> torch.Tensor:
    """The depthwise causal conv as a sum of W shifted products, in fp32 at least, returned in padded's dtype:
    out[:, t] = sum_j padded[:, t + j] * weight[:, j] for padded [B, T + W - 1, C], weight [C, W].

    What the compiled forms run: inductor fuses the products (and their gradients: shifted sums for the
    input, reductions over batch and time for the weight) into a few elementwise and reduction kernels,
    where F.conv1d is an extern depthwise-convolution kernel with channels-first copies around it.
    """
    acc = torch.promote_types(padded.dtype, torch.float32)
    w = weight.to(acc)
    out = padded[:, :T].to(acc) * w[:, 0]
    for j in range(1, weight.shape[1]):
        out = out + padded[:, j:j + T].to(acc) * w[:, j]
    return cast(out, padded.dtype)


class CausalConv(nn.Module):
    """Depthwise causal conv over time; weight [C, W] with the last tap on the current token."""

    def __init__(self, channels: int, width: int, bias: bool, activation: str):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, width))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.activation = activation

    def _activate(self, x):
        return F.silu(x) if self.activation == "silu" else x

    def forward(self, x, window=None, lengths=None):
        """x [B, T, C], window [B, W-1, C] (earlier inputs, zeros if None) -> (out [B, T, C], new window);
        with lengths [B], row b's new window ends at its input lengths[b] - 1 (the rest is padding)."""
        B, T, C = x.shape
        W = self.weight.shape[1]
        if lengths is None and T >= W - 1 and self.passes_through(x):
            return x, x[:, T - (W - 1):]
        padded = self._after_window(x, window)
        if lengths is None:
            tail = padded[:, T:]
        else:
            slots = lengths[:, None] + torch.arange(W - 1, device=x.device)              # [B, W-1] in padded
            tail = padded.gather(1, slots[:, :, None].expand(B, W - 1, C))
            if self.passes_through(x):
                return x, tail
        if torch.compiler.is_compiling():
            out = causal_conv_taps(padded, self.weight, T)
        elif cpu_linear.applies(x):
            out = self._cpu_taps(padded, T)
        else:
            out = F.conv1d(padded.transpose(1, 2), cast(self.weight[:, None, :], x.dtype), groups=C)
            # back to [B, T, C] in memory too: a channels-first view would leave q/k/v with a strided
            # last axis, which SDPA's flash kernels refuse (silently falling back to the math kernel)
            out = out.transpose(1, 2).contiguous()
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return self._activate(out), tail

    def _cpu_taps(self, padded, T: int):
        """The conv of padded [B, T + W - 1, C] (fp32, CPU, no autograd) as W shifted products summed in place,
        in causal_conv_taps' order: out [B, T, C]. A third of F.conv1d's time on the CPU, which needs channels-first
        copies around its kernel; the taps are read as contiguous rows [W, C] (a column of the [C, W] weight is a
        strided operand, which the elementwise kernels read several times slower)."""
        rows = self.tap_rows()
        out = padded[:, :T] * rows[0]
        for j in range(1, rows.shape[0]):
            out.addcmul_(padded[:, j:j + T], rows[j])
        return out

    def tap_rows(self):
        """The weight [C, W] as contiguous rows [W, C], tap j in row j (detached): what the CPU paths multiply by."""
        return self.weight.detach().t().contiguous()

    def tail(self, x, window=None):
        """The window forward(x, window) leaves (the last W - 1 inputs, from `window` or zeros where x is shorter),
        without the conv's output."""
        T, W = x.shape[1], self.weight.shape[1]
        return x[:, T - (W - 1):] if T >= W - 1 else self._after_window(x, window)[:, T:]

    def _after_window(self, x, window):
        """[window | x] [B, W - 1 + T, C]: the earlier inputs (zeros if None) in x's dtype, then x."""
        B, _, C = x.shape
        history = x.new_zeros(B, self.weight.shape[1] - 1, C) if window is None else cast(window, x.dtype)
        return torch.cat([history, x], dim=1)

    def is_identity(self) -> bool:
        """Whether the conv passes its input through: last tap 1, the others 0, no bias, no activation (the convs
        of a Llama import). Read from the weights once per weight version (a host sync on a GPU)."""
        params = [self.weight] + ([] if self.bias is None else [self.bias])
        key = tuple((p.data_ptr(), p._version) for p in params)
        if getattr(self, "_identity", (None,))[0] != key:
            with torch.no_grad():
                w = self.weight
                identity = (self.activation != "silu" and (self.bias is None or not bool(self.bias.any()))
                            and bool((w[:, -1] == 1).all()) and bool((w[:, :-1] == 0).all()))
            self._identity = (key, identity)
        return self._identity[1]

    def passes_through(self, x) -> bool:
        """Whether forward may return x itself: an identity conv, on the CPU, outside autograd (whose gradient
        for the conv weights needs the real conv) and outside torch.compile."""
        return (x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and self.is_identity())

    def step(self, x, window):
        """One token x [B, C]; shifts `window` [B, W-1, C] in place."""
        full = torch.cat([window, cast(x[:, None], window.dtype)], dim=1)                # [B, W, C]
        out = (fp32(full) * fp32(self.weight).t()).sum(1)
        if self.bias is not None:
            out = out + fp32(self.bias)
        window.copy_(full[:, 1:])
        return cast(self._activate(out), x.dtype)


# ----- the mixer: both modes over shared keys and values -----
class OryxMixer(nn.Module):
    def __init__(self, cfg: OryxConfig):
        super().__init__()
        self.cfg = cfg
        D, H, Hkv, d, dv, W = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim, cfg.conv_width

        def linear(out_features):
            return nn.Linear(D, out_features, bias=False)

        # cfg.sharing (oryx_core.spec): "kv" both modes read k_proj/v_proj, "none" the recurrence has its own
        # k_rec/v_rec (and convs), "qkv" it also reads q_attn (through its own conv_q) and there is no q_rec.
        self.separate_kv = cfg.sharing == "none"
        self.recurrent_kv_convs = cfg.recurrent_kv_convs  # conv_k_rec/conv_v_rec: the recurrence's own
        self.recurrent_kv_inputs = ("k_rec", "v_rec") if self.separate_kv else ("k_proj", "v_proj")
        self.recurrent_query = "q_attn" if cfg.sharing == "qkv" else "q_rec"
        self.k_proj, self.v_proj = linear(Hkv * d), linear(Hkv * dv)
        self.q_attn = linear(H * d)
        self.q_rec = linear(H * d) if cfg.sharing != "qkv" else None
        if self.separate_kv:
            self.k_rec, self.v_rec = linear(Hkv * d), linear(Hkv * dv)
        self.g_proj = linear(H * dv) if cfg.output_gate else None
        self.o_proj = nn.Linear(H * dv, D, bias=False)
        act = cfg.conv_act
        self.conv_k = CausalConv(Hkv * d, W, cfg.conv_bias, act)
        self.conv_v = CausalConv(Hkv * dv, W, cfg.conv_bias, act)
        self.conv_q = CausalConv(H * d, W, cfg.conv_bias, act)
        if self.recurrent_kv_convs:
            self.conv_k_rec = CausalConv(Hkv * d, W, cfg.conv_bias, act)
            self.conv_v_rec = CausalConv(Hkv * dv, W, cfg.conv_bias, act)
        norm_width = dv if cfg.o_norm_grouping == "head" else H * dv
        self.o_norm = RMSNorm(norm_width, cfg.norm_eps) if cfg.output_norm else None
        if cfg.mixer == "gdn":
            self.a_proj, self.b_proj = linear(Hkv), linear(Hkv)
        else:
            self.dt_proj = linear(Hkv)
            self.D_skip = nn.Parameter(torch.ones(Hkv))
        self.A_log = nn.Parameter(torch.zeros(Hkv))
        self.dt_bias = nn.Parameter(torch.zeros(Hkv))
        # Input projections in one fixed order: the attention-only ones first, the recurrent-only ones last,
        # so what either mode alone needs is one contiguous run of rows of their concatenated weight; q_rec
        # comes last, so a state advanced without its readout (`state_only`) drops it from the run.
        gates = ("a_proj", "b_proj") if cfg.mixer == "gdn" else ("dt_proj",)
        gate = ("g_proj",) if cfg.output_gate else ()
        attention_only, shared, recurrent_only = {
            "kv": (("q_attn",), ("k_proj", "v_proj") + gate, gates + ("q_rec",)),
            "none": (("q_attn", "k_proj", "v_proj"), gate, ("k_rec", "v_rec") + gates + ("q_rec",)),
            "kv-proj": (("q_attn",), ("k_proj", "v_proj") + gate, gates + ("q_rec",)),
            "qkv": ((), ("q_attn", "k_proj", "v_proj") + gate, gates),
        }[cfg.sharing]
        self.projection_order = attention_only + shared + recurrent_only
        self._shared_rows = (len(attention_only), len(attention_only) + len(shared))  # [start, end) in the order
        self._fused = None  # (key, weight): the concatenation for inference, rebuilt whenever a part changes

    # One matmul for every input projection a call needs. The checkpoint (and state_dict) keeps each weight
    # apart; with gradients on they are concatenated afresh in each call (autograd splits the gradient back),
    # without, the concatenation is cached and rebuilt when any part's storage or version changes.
    fuse_projections = True
    # Set by `frozen_projections` around compiled no-grad calls (the compiled decode step): the traced graph then
    # reads the cached concatenation instead of concatenating the weights on every call.
    frozen_projections = False

    def _projections(self, xn, attention: bool, recurrent: bool, recurrent_query: bool = True, norm=None) -> dict:
        """{name: xn @ W_name^T} for the projections both modes read (with the default sharing k_proj, v_proj,
        g_proj), plus the attention-only ones when `attention`, plus the recurrent-only ones (q_rec and the
        recurrence's gates) when `recurrent`, q_rec left out when not `recurrent_query`. With `norm` (an RMSNorm;
        only where the decode matvec kernel applies, outside autograd) xn is the un-normed input and one kernel
        norms it and multiplies."""
        order = self.projection_order
        first = 0 if attention else self._shared_rows[0]
        last = len(order) if recurrent else self._shared_rows[1]
        if recurrent and not recurrent_query and order[-1] == "q_rec":
            last -= 1
        names = order[first:last]
        layers = [getattr(self, name) for name in names]
        sizes = [layer.out_features for layer in layers]
        start, end = self._row_span(first, last)
        if norm is not None:
            from .kernels.decode_matvec import matvec

            weight = self._fused_weight()[start:end]
            return dict(zip(names, matvec(xn, weight, norm.weight, norm.eps).split(sizes, dim=-1)))
        if not self.fuse_projections:
            return {name: layer(xn) for name, layer in zip(names, layers)}
        if cpu_linear.applies(xn):
            return dict(zip(names, cpu_linear.linear(xn, self._packed_rows(start, end)).split(sizes, -1)))
        compiling = torch.compiler.is_compiling()
        if torch.is_grad_enabled() or (compiling and not (self.frozen_projections and self._fused is not None)):
            weight = torch.cat([layer.weight for layer in layers])
        else:
            weight = (self._fused[1] if compiling else self._fused_weight())[start:end]
        return dict(zip(names, F.linear(xn, weight).split(sizes, dim=-1)))

    def _row_span(self, first: int, last: int) -> tuple[int, int]:
        """[start, end): the rows of projections projection_order[first:last] in the concatenated weight."""
        widths = [getattr(self, name).out_features for name in self.projection_order]
        return sum(widths[:first]), sum(widths[:last])

    def _fused_weight(self) -> torch.Tensor:
        self._fused = concatenated_weights(self._fused, [getattr(self, name).weight for name in self.projection_order])
        return self._fused[1]

    def _packed_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of the concatenated projection weight, reordered for cpu_linear; kept with the
        concatenation they come from (rebuilt with it, dropped with it)."""
        fused = self._fused_weight()
        if getattr(self, "_packed", (None,))[0] is not self._fused:
            self._packed = (self._fused, {})
        rows = self._packed[1]
        if (start, end) not in rows:
            rows[start, end] = cpu_linear.reorder(fused[start:end])
        return rows[start, end]

    def train(self, mode: bool = True):
        # Training changes the weights, also in ways their version counters miss (fused optimizers write them
        # without a bump, `.data` writes): entering training mode drops the cached concatenation, so the first
        # no-grad call after it (an evaluation between steps) builds it from the current weights.
        if mode:
            self._fused = None
        return super().train(mode)

    # -- pieces shared by the parallel and the step form (leading dims: [B, T] or [B]) --
    def _recurrence_inputs(self, proj: dict, k, v, q_raw, l2_normalize_qk: bool = True, grouped: bool = False) -> dict:
        """Kernel arguments, heads repeated to the H query heads (the kernels take equal heads) unless `grouped`
        (GDN's grouped recurrence reads each key/value head once). GDN's q and k are L2-normalised here unless
        `l2_normalize_qk` is False (the fused decode step normalises them)."""
        cfg = self.cfg
        lead, G = k.shape[:-1], 1 if grouped else cfg.group_size
        q = None if q_raw is None else q_raw.view(*lead, cfg.n_heads, cfg.head_dim)   # None: the state alone
        k = k.view(*lead, cfg.n_kv_heads, cfg.head_dim)
        v = repeat_heads(v.view(*lead, cfg.n_kv_heads, cfg.v_head_dim), G, -2)
        A = -torch.exp(fp32(self.A_log))
        if cfg.mixer == "gdn":
            log_alpha = A * F.softplus(fp32(proj["a_proj"]) + fp32(self.dt_bias))
            beta = torch.sigmoid(fp32(proj["b_proj"]))
            if l2_normalize_qk:
                q, k = None if q is None else l2_normalize(q), l2_normalize(k)
            return dict(q=q, k=repeat_heads(k, G, -2), v=v,
                        g=repeat_heads(log_alpha, G, -1), beta=repeat_heads(beta, G, -1))
        dt = F.softplus(fp32(proj["dt_proj"]) + fp32(self.dt_bias))
        return dict(q=q, k=repeat_heads(k, G, -2), v=v, dt=repeat_heads(dt, G, -1), A=repeat_heads(A, G, 0),
                    D=repeat_heads(fp32(self.D_skip), G, 0))

    def _keys_values(self, k, v, rope):
        """Head-major attention keys (RoPE applied) and values: [B, Hkv, T, d], [B, Hkv, T, dv]."""
        B, T = k.shape[:2]
        keys = k.view(B, T, self.cfg.n_kv_heads, self.cfg.head_dim)
        if rope is not None:
            keys = apply_rope(keys, *rope)
        return keys.transpose(1, 2), v.view(B, T, self.cfg.n_kv_heads, self.cfg.v_head_dim).transpose(1, 2)

    def _attention_queries(self, q_attn, rope):
        B, T = q_attn.shape[:2]
        q = q_attn.view(B, T, self.cfg.n_heads, self.cfg.head_dim)
        return apply_rope(q, *rope) if rope is not None else q

    def _output(self, o, proj: dict, dtype):
        """o [B, T, H, dv] -> gated output norm -> o_proj; the same formula as reference.gated_out_norm."""
        cfg = self.cfg
        B, T, H, dv = o.shape
        g = proj["g_proj"].reshape(B, T, H, dv) if self.g_proj is not None else None
        if cfg.o_norm_grouping == "all":
            o = o.reshape(B, T, 1, H * dv)
            g = None if g is None else g.reshape(B, T, 1, H * dv)
        y = fp32(o)
        gate = F.silu(fp32(g)) if g is not None else None
        if self.o_norm is None:
            y = y if gate is None else y * gate
        elif cfg.gate_before_norm:
            y = self.o_norm(y if gate is None else y * gate)
        else:
            y = self.o_norm(y) if gate is None else self.o_norm(y) * gate
        return self.o_proj(y.reshape(B, T, H * dv).to(dtype))

    # -- parallel form (training, eval, prefill) --
    def forward(self, xn, plan: AttentionPlan, rope, layer_cache: LayerCache | None = None, lengths=None,
                last_only: bool = False, staged: StagedStates | None = None):
        """xn [B, T, D] normed input; plan: the modes; rope (cos, sin) for positions plan.q_offset.. or None.
        lengths [B] (with a cache): row b's tokens from lengths[b] on are right padding, which leaves its conv
        windows and recurrent state as they were after its last real token; their keys and values land in
        KV cache slots that later tokens overwrite before anything reads them. `last_only`: the caller reads only
        the last token's output; where every token attends, on the CPU path, the output is that token's alone
        [B, 1, D] (the cache still takes every token). `staged`: where the state advances without any token
        reading it on the CPU (_advance_state_alone), its inputs go there and the state is left for
        staged.finish() to compute (the cache's state is stale until then); None: computed here."""
        windows = layer_cache.conv if layer_cache is not None else {}
        # with a cache the state must advance anyway, unless it was dropped (then no token is recurrent);
        # likewise the KV cache takes every token's key and value while it is kept
        recurrent = plan.any_recurrent or (layer_cache is not None and layer_cache.recurrent is not None)
        attention_kv = plan.any_attention or (layer_cache is not None and layer_cache.keys is not None)
        # a state advanced by tokens none of which reads it (a prompt in attention mode before recurrent decoding):
        # the grouped recurrence computes the final state alone, and q_rec is projected only for the tokens its
        # conv window keeps
        state_only = (recurrent and not plan.any_recurrent and lengths is None and self.recurrent_query == "q_rec"
                      and self.cfg.mixer == "gdn" and grouped_recurrence_applies(xn))
        # the last token's output alone where every token is recurrent: the state advanced alone as above, then
        # read by that token's query (its conv needs the last W inputs of q_rec)
        last_recurrent = (last_only and lengths is None and not plan.any_attention and not plan.traced
                          and self.recurrent_query == "q_rec" and self.cfg.mixer == "gdn"
                          and grouped_recurrence_applies(xn) and cpu_linear.applies(xn))
        state_only = state_only or last_recurrent
        # the last token's output alone: its query attends to every key (no mask), and the attention-only
        # projection (q_attn, when it is the only one) runs for that token only
        last_row = (last_only and lengths is None and plan.all_attention and not plan.traced
                    and cpu_linear.applies(xn))
        query_apart = last_row and self.projection_order[:self._shared_rows[0]] == ("q_attn",)
        proj = self._projections(xn, (plan.any_attention and not query_apart) or (self.separate_kv and attention_kv),
                                 recurrent, recurrent_query=not state_only)
        if query_apart:
            proj["q_attn"] = cpu_linear.linear(xn[:, -1:], self._packed_rows(*self._row_span(0, 1)))
        k = v = None
        if attention_kv or not self.separate_kv:
            k, k_tail = self.conv_k(proj["k_proj"], windows.get("k"), lengths)
            v, v_tail = self.conv_v(proj["v_proj"], windows.get("v"), lengths)
            if layer_cache is not None:
                layer_cache.conv["k"].copy_(k_tail)
                layer_cache.conv["v"].copy_(v_tail)
        o_rec = o_attn = None
        if recurrent:
            if state_only:  # no readout: the conv window's last W - 1 inputs are all q_rec is needed for
                W = self.conv_q.weight.shape[1]
                T, keep = xn.shape[1], min(xn.shape[1], W if last_recurrent else W - 1)
                q_raw, q_tail = None, windows.get("q")
                if keep:
                    # a few rows: the product is the weight's one read from memory, which F.linear's sgemm makes
                    # faster than cpu_linear's reordered copy (and no copy is kept)
                    q_proj = F.linear(xn[:, T - keep:], self.q_rec.weight)
                    if last_recurrent:
                        q_out, q_tail = self.conv_q(q_proj, windows.get("q"))
                        q_raw = q_out[:, -1:]
                    else:  # the window alone: no token reads the conv's output
                        q_tail = self.conv_q.tail(q_proj, windows.get("q"))
            else:
                q_raw, q_tail = self.conv_q(proj[self.recurrent_query], windows.get("q"), lengths)
            if state_only and not last_recurrent and cpu_linear.applies(xn):
                o_rec = None
                self._advance_state_alone(proj, k, v, layer_cache, staged)
                layer_cache.conv["q"].copy_(q_tail)
            else:
                k_rec, v_rec = k, v
                if self.recurrent_kv_convs:
                    k_in, v_in = self.recurrent_kv_inputs
                    k_rec, k_rec_tail = self.conv_k_rec(proj[k_in], windows.get("k_rec"), lengths)
                    v_rec, v_rec_tail = self.conv_v_rec(proj[v_in], windows.get("v_rec"), lengths)
                grouped = state_only or (self.cfg.mixer == "gdn" and self.cfg.group_size > 1
                                         and grouped_recurrence_applies(xn))
                r = self._recurrence_inputs(proj, k_rec, v_rec, None if last_recurrent else q_raw, grouped=grouped)
                if lengths is not None:  # padding leaves the state alone: no decay (g = 0), no write (beta = 0, dt = 0)
                    real = (torch.arange(xn.shape[1], device=xn.device)[None, :] < lengths[:, None])[:, :, None]
                    for name in ("g", "beta") if self.cfg.mixer == "gdn" else ("dt",):
                        r[name] = r[name] * real
                if last_recurrent:
                    o_rec, final = self._last_token_readout(r, q_raw,
                                                            None if layer_cache is None else layer_cache.recurrent)
                elif state_only:  # (a cache, as `recurrent` needs one where no token is recurrent)
                    o_rec, final = None, self._final_state_alone(r, layer_cache.recurrent)
                else:
                    o_rec, final = self._recurrence(r, None if layer_cache is None else layer_cache.recurrent)
                if layer_cache is not None:
                    if final is not layer_cache.recurrent:
                        layer_cache.recurrent.copy_(final)
                    layer_cache.conv["q"].copy_(q_tail)
                    if self.recurrent_kv_convs:
                        layer_cache.conv["k_rec"].copy_(k_rec_tail)
                        layer_cache.conv["v_rec"].copy_(v_rec_tail)
        if attention_kv:
            o_attn = self._attention(proj, k, v, plan, rope, layer_cache, last_row)
        if last_recurrent or last_row:  # one mode for every token: the other's output, if computed, is not read
            last_gate = {name: t[:, -1:] for name, t in proj.items() if name == "g_proj"}
            return self._output(o_rec if last_recurrent else o_attn, last_gate, xn.dtype)
        if o_attn is None:
            o = o_rec
        elif o_rec is None:
            o = o_attn
        else:
            o = torch.where(plan.modes[:, :, None, None], o_attn, o_rec)
        return self._output(o, proj, xn.dtype)

    def _recurrence(self, r: dict, initial_state):
        state_args = dict(initial_state=initial_state, output_final_state=initial_state is not None)
        if self.cfg.mixer == "gdn":
            if r["q"] is None or r["k"].shape[-2] != r["q"].shape[-2]:  # kv heads once: grouped_recurrence_applies
                return self._grouped_recurrence(r, initial_state)
            return gated_delta_rule(r["q"], r["k"], r["v"], r["g"], r["beta"], scale=self.cfg.gdn_scale,
                                    **state_args)
        return ssd(r["q"], r["k"], r["v"], r["dt"], r["A"], r["D"], **state_args)

    def _grouped_recurrence(self, r: dict, initial_state):
        """GDN's chunked torch recurrence run once per key/value head group (r: keys, values and gates per key/value
        head). Exact: the G per-query-head copies of a cached state are equal (every path that writes the state
        computes the copies from the same keys, values and gates)."""
        G, Hkv = self.cfg.group_size, self.cfg.n_kv_heads
        state = None if initial_state is None else initial_state.unflatten(1, (Hkv, G))[:, :, 0]
        o, final = chunk_gated_delta_rule_grouped(r["q"], r["k"], r["v"], r["g"], r["beta"], scale=self.cfg.gdn_scale,
                                                  initial_state=state, output_final_state=initial_state is not None)
        return o, None if final is None else final.repeat_interleave(G, dim=1)

    def _advance_state_alone(self, proj: dict, k, v, layer_cache: LayerCache, staged: StagedStates | None = None):
        """GDN's state and the recurrence's key/value conv windows advanced over tokens none of which reads the state
        (fp32 on the CPU, a cache, no lengths); k, v: the attention convs' outputs (what the recurrence reads with
        sharing "kv"). The same function as conv_k_rec/conv_v_rec, _recurrence_inputs and _final_state_alone, up to
        rounding, in fewer passes: keys, values and gates are computed straight into the head-major chunked layout
        grouped_final_state reads, the recurrence's two convs (sharing "kv-proj", "none") run there as one set of
        shifted products over both, and the final state goes straight into its G query heads' copies. `staged`:
        that layout is written into its buffer and the state left to staged.finish() (the windows advance here)."""
        cfg = self.cfg
        Hkv, K, V, W = cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim, cfg.conv_width
        a, b = proj["a_proj"], proj["b_proj"]                                            # [B, T, Hkv]
        B, T = a.shape[:2]
        NT, C = chunk_layout(T)
        # per key/value head its tokens' [key | value | log-decay | write rate], zeros after T: padded tokens
        # (g = beta = 0) leave the state as it is
        shape = (B, Hkv, NT * C, K + V + 2)
        packed = a.new_empty(shape) if staged is None else staged.slot(shape, a)
        packed[:, :, T:].zero_()
        kv = packed[:, :, :T, :K + V]
        if self.recurrent_kv_convs:
            windows, (k_in, v_in) = layer_cache.conv, self.recurrent_kv_inputs
            # each conv's window, then its inputs, head-major: [B, Hkv, W - 1 + T, K + V]
            inputs = packed.new_empty(B, Hkv, W - 1 + T, K + V)
            for x, window, cols, width in ((proj[k_in], windows["k_rec"], slice(0, K), K),
                                           (proj[v_in], windows["v_rec"], slice(K, K + V), V)):
                inputs[:, :, :W - 1, cols].copy_(window.view(B, W - 1, Hkv, width).transpose(1, 2))
                inputs[:, :, W - 1:, cols].copy_(x.view(B, T, Hkv, width).transpose(1, 2))
            convs = (self.conv_k_rec, self.conv_v_rec)
            # tap j of both convs as one row per head [Hkv, 1, K + V], broadcast over tokens; contiguous rows (a
            # strided operand slows the elementwise kernels several times)
            taps = torch.cat([conv.weight.detach().t().view(W, Hkv, 1, width) for conv, width in zip(convs, (K, V))],
                             -1)
            torch.mul(inputs[:, :, :T], taps[0], out=kv)                                # CausalConv's tap order
            for j in range(1, W):
                kv.addcmul_(inputs[:, :, j:j + T], taps[j])
            if self.conv_k_rec.bias is not None:
                kv.add_(torch.cat([self.conv_k_rec.bias.view(Hkv, 1, K), self.conv_v_rec.bias.view(Hkv, 1, V)], -1))
            if self.conv_k_rec.activation == "silu":
                F.silu(kv, inplace=True)
            windows["k_rec"].view(B, W - 1, Hkv, K).copy_(inputs[:, :, T:, :K].transpose(1, 2))
            windows["v_rec"].view(B, W - 1, Hkv, V).copy_(inputs[:, :, T:, K:].transpose(1, 2))
        else:
            kv[..., :K].copy_(k.view(B, T, Hkv, K).transpose(1, 2))
            kv[..., K:].copy_(v.view(B, T, Hkv, V).transpose(1, 2))
        # _recurrence_inputs' gates: log-decay A softplus(a + dt_bias), write rate sigmoid(b)
        torch.mul(-torch.exp(self.A_log), F.softplus(a + self.dt_bias), out=packed[:, :, :T, K + V].transpose(1, 2))
        torch.sigmoid(b, out=packed[:, :, :T, K + V + 1].transpose(1, 2))
        state = layer_cache.recurrent.unflatten(1, (Hkv, cfg.group_size))               # [B, Hkv, G, d, dv], a view
        if staged is not None:
            staged.add(state, K, NT)
            return
        final = grouped_final_state(packed, K, NT, state[:, :, 0], key_norm_eps=L2NORM_EPS)  # keys normalised there
        state.copy_(final[:, :, None].expand_as(state))

    def _final_state_alone(self, r: dict, state):
        """GDN's final state over r's keys, values and gates (per key/value head, as _grouped_recurrence) from
        `state` [B, H, d, dv], written into `state` itself (each key/value head's state to its G query heads' copies,
        equal as _grouped_recurrence says); returns it."""
        per_group = state.unflatten(1, (self.cfg.n_kv_heads, self.cfg.group_size))   # [B, Hkv, G, d, dv], a view
        final = chunk_gated_delta_rule_grouped(None, r["k"], r["v"], r["g"], r["beta"],
                                               initial_state=per_group[:, :, 0], output_final_state=True)[1]
        per_group.copy_(final[:, :, None].expand_as(per_group))
        return state

    def _last_token_readout(self, r: dict, q_last, initial_state):
        """GDN's final state over r's keys, values and gates (per key/value head, as _grouped_recurrence) and the
        last token's readout scale·S_T^T q_T from it (q_last [B, 1, H * d] after its conv): (o [B, 1, H, dv], the
        final state per query head [B, H, d, dv] or None without an initial state)."""
        cfg = self.cfg
        G, Hkv = cfg.group_size, cfg.n_kv_heads
        state = None if initial_state is None else initial_state.unflatten(1, (Hkv, G))[:, :, 0]
        final = chunk_gated_delta_rule_grouped(None, r["k"], r["v"], r["g"], r["beta"], initial_state=state,
                                               output_final_state=True)[1]                # [B, Hkv, d, dv]
        B = q_last.shape[0]
        q = l2_normalize(q_last.reshape(B, Hkv, G, cfg.head_dim))
        o = torch.matmul(q.to(final.dtype), final).mul_(cfg.gdn_scale)                    # [B, Hkv, G, dv]
        o = cast(o.view(B, 1, cfg.n_heads, cfg.v_head_dim), r["v"].dtype)
        return o, None if initial_state is None else final.repeat_interleave(G, dim=1)

    def _attention(self, proj: dict, k, v, plan: AttentionPlan, rope, layer_cache, last_row: bool = False):
        """Appends this chunk's keys/values to the cache (if any) and attends for the attention-mode rows (with
        `last_row`, for the last token only, which every key precedes: [B, 1, H, dv])."""
        keys, values = self._keys_values(k, v, rope)
        offset = plan.q_offset
        if layer_cache is not None and layer_cache.keys is not None:
            T = keys.shape[2]
            layer_cache.keys[:, :, offset:offset + T] = keys
            layer_cache.values[:, :, offset:offset + T] = values
            keys = layer_cache.keys[:, :, :offset + T].to(keys.dtype)
            values = layer_cache.values[:, :, :offset + T].to(values.dtype)
        if not plan.any_attention:
            return None
        if last_row:
            q = self._attention_queries(proj["q_attn"][:, -1:], None if rope is None else (rope[0][-1:], rope[1][-1:]))
            o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, scale=self.cfg.head_dim ** -0.5,
                                               enable_gqa=q.shape[2] != keys.shape[1])
            return o.transpose(1, 2)
        q = self._attention_queries(proj["q_attn"], rope).transpose(1, 2)
        o = plan_attention(q, keys, values, plan, scale=self.cfg.head_dim ** -0.5)
        return o.transpose(1, 2)

    # -- step form (decoding one token per sequence) --
    def step(self, xn, modes, rope, layer_cache: LayerCache, position, attend: bool):
        """xn [B, D]; modes [B] bool; position [B] (the slot this token takes). Graph-capturable."""
        if fused_step_applies(self, layer_cache):
            return self._fused_step(xn, modes, rope, layer_cache, position, attend)
        cfg = self.cfg
        B = xn.shape[0]
        recurrent = layer_cache.recurrent is not None
        has_kv = layer_cache.keys is not None
        proj = self._projections(xn[:, None], attend or not recurrent or (self.separate_kv and has_kv),
                                 recurrent)                                          # each [B, 1, *]
        k = v = keys = values = None
        if has_kv or not self.separate_kv:
            k = self.conv_k.step(proj["k_proj"][:, 0], layer_cache.conv["k"])
            v = self.conv_v.step(proj["v_proj"][:, 0], layer_cache.conv["v"])
            keys, values = self._keys_values(k[:, None], v[:, None], rope)          # [B, Hkv, 1, *]
        if not recurrent:  # dropped: every token attends (the caller checked), no recurrent work
            slot = position[:1]
            layer_cache.keys.index_copy_(2, slot, cast(keys, layer_cache.keys.dtype))
            layer_cache.values.index_copy_(2, slot, cast(values, layer_cache.values.dtype))
            q = self._attention_queries(proj["q_attn"], rope)[:, 0]
            o = decode_attention(q, layer_cache.keys, layer_cache.values, position, cfg.head_dim ** -0.5)
            return self._output(cast(o, xn.dtype)[:, None], proj, xn.dtype)[:, 0]
        q_raw = self.conv_q.step(proj[self.recurrent_query][:, 0], layer_cache.conv["q"])
        if self.recurrent_kv_convs:
            k_in, v_in = self.recurrent_kv_inputs
            k = self.conv_k_rec.step(proj[k_in][:, 0], layer_cache.conv["k_rec"])
            v = self.conv_v_rec.step(proj[v_in][:, 0], layer_cache.conv["v_rec"])
        step_proj = {name: t[:, 0] for name, t in proj.items()}
        # the fused GDN decode kernel L2-normalises q and k itself (same epsilon), saving their launches
        in_kernel_norm = cfg.mixer == "gdn" and fused_decode_available(layer_cache.recurrent)
        r = self._recurrence_inputs(step_proj, k, v, q_raw, l2_normalize_qk=not in_kernel_norm)
        o_rec = self._recurrence_step(r, layer_cache, position, None if keys is None else keys[:, :, 0],
                                      None if values is None else values[:, :, 0], qk_normalized=not in_kernel_norm)
        if not attend:
            return self._output(o_rec[:, None], proj, xn.dtype)[:, 0]
        q = self._attention_queries(proj["q_attn"], rope)[:, 0]                     # [B, H, d]
        o_attn = decode_attention(q, layer_cache.keys, layer_cache.values, position, cfg.head_dim ** -0.5)
        o = torch.where(modes.view(B, 1, 1), cast(o_attn, o_rec.dtype), o_rec)
        return self._output(o[:, None], proj, xn.dtype)[:, 0]

    def _fused_step(self, xn, modes, rope, layer_cache: LayerCache, position, attend: bool, norm=None,
                    residual=None):
        """`step` through the fused kernels of kernels/decode_step.py: the input projections' matmul, at most two
        kernels (the attention token when a row attends or the recurrent state was dropped, the GDN or Mamba-2 token
        when the state is kept), o_proj. The same function as the unfused step (fused_step_applies says when it runs).
        With sharing "kv-proj" the recurrent kernel reads the recurrence's own convs and windows (k_rec, v_rec) and
        also shifts the attention's k and v windows, which the attention kernel leaves to it when the state is kept.
        With `norm` and `residual` (the decode matvec kernels, kernels/decode_matvec.py) xn is the un-normed
        residual stream, normed in the projections' kernel, and the result is residual + the mixer's output, added
        in o_proj's kernel."""
        from .kernels.decode_step import (attention_split, attention_token_step, recurrent_token_step,
                                          split_heads_applies)

        cfg = self.cfg
        recurrent = layer_cache.recurrent is not None
        proj = self._projections(xn, attend or not recurrent, recurrent, norm=norm)      # each [B, *]
        cos, sin = (None, None) if rope is None else (t.reshape(t.shape[0], -1) for t in rope)
        silu = cfg.conv_act == "silu"
        norm_w, norm_eps = (None, 0.0) if self.o_norm is None else (self.o_norm.weight, self.o_norm.eps)
        gate, windows = proj.get("g_proj"), layer_cache.conv
        convs = (self.conv_k.weight, self.conv_k.bias, self.conv_v.weight, self.conv_v.bias)
        o_attn = None
        if attend or not recurrent:
            o_attn = attention_token_step(proj["q_attn"], proj["k_proj"], proj["v_proj"], gate, *convs, silu,
                                          windows["k"], windows["v"], layer_cache.keys, layer_cache.values, position,
                                          cos, sin, cfg.head_dim ** -0.5, cfg.n_heads, not recurrent, norm_w,
                                          norm_eps, cfg.gate_before_norm, xn.dtype,
                                          attention_split(layer_cache.keys.shape[2]))
            if not recurrent:
                return self._fused_output(o_attn, residual)
        append = not attend and layer_cache.keys is not None  # an attending step's kernel appended already
        gdn = cfg.mixer == "gdn"
        own_convs = {}
        if self.recurrent_kv_convs:  # kv-proj: the recurrence's own convs of k_proj's and v_proj's outputs
            own_convs = dict(conv_k_rec_w=self.conv_k_rec.weight, conv_k_rec_b=self.conv_k_rec.bias,
                             conv_v_rec_w=self.conv_v_rec.weight, conv_v_rec_b=self.conv_v_rec.bias,
                             win_k_rec=windows["k_rec"], win_v_rec=windows["v_rec"])
        gates = (proj["a_proj"], proj["b_proj"]) if gdn else (proj["dt_proj"], None)
        y = recurrent_token_step(proj[self.recurrent_query], proj["k_proj"], proj["v_proj"], *gates, gate,
                                 self.conv_q.weight, self.conv_q.bias, *convs, silu, windows["q"], windows["k"],
                                 windows["v"], self.A_log, self.dt_bias, None if gdn else self.D_skip,
                                 layer_cache.recurrent, cfg.gdn_scale, L2NORM_EPS, norm_w, norm_eps,
                                 cfg.gate_before_norm, layer_cache.keys if append else None,
                                 layer_cache.values if append else None, position, cos, sin, modes if attend else None,
                                 o_attn, xn.dtype,
                                 split_heads=FUSED_SPLIT_HEADS and split_heads_applies(xn.shape[0], cfg.n_heads,
                                                                                       xn.device), **own_convs)
        return self._fused_output(y, residual)

    def _fused_output(self, y, residual):
        """o_proj of the fused step's readout y [B, H * V]; with `residual`, residual + it in one matvec kernel."""
        if residual is None:
            return self.o_proj(y)
        from .kernels.decode_matvec import matvec

        return matvec(y, self.o_proj.weight, residual=residual)

    def _recurrence_step(self, r: dict, layer_cache: LayerCache, position, keys, values, qk_normalized=True):
        """One recurrence token, state updated in place; also writes this token's key/value to the KV cache.

        On CUDA (or under TRITON_INTERPRET=1) the fused Triton decode step does both in one
        launch; elsewhere the per-token torch recurrence runs and the cache is written with index_copy_.
        """
        state, has_kv = layer_cache.recurrent, layer_cache.keys is not None
        if fused_decode_available(state):  # Triton is imported only here, so CPU-only installs need none
            append = dict(k_cache=layer_cache.keys, v_cache=layer_cache.values, cache_pos=position,
                          k_append=keys.to(layer_cache.keys.dtype), v_append=values.to(layer_cache.values.dtype)) \
                if has_kv else {}
            if self.cfg.mixer == "gdn":
                from .kernels.gdn import gated_delta_rule_decode_step

                return gated_delta_rule_decode_step(r["q"], r["k"], r["v"], r["g"], r["beta"], state,
                                                    scale=self.cfg.gdn_scale, use_qk_l2norm=not qk_normalized,
                                                    **append)
            from .kernels.mamba2 import ssd_decode_step

            return ssd_decode_step(r["q"], r["k"], r["v"], r["dt"], r["A"], r["D"], state, **append)
        if has_kv:
            rows = torch.arange(keys.shape[0], device=keys.device)
            layer_cache.keys[rows, :, position] = cast(keys, layer_cache.keys.dtype)  # sequence b at its position[b]
            layer_cache.values[rows, :, position] = cast(values, layer_cache.values.dtype)
        if self.cfg.mixer == "gdn":
            return gated_delta_rule_step_torch(r["q"], r["k"], r["v"], r["g"], r["beta"], state,
                                               scale=self.cfg.gdn_scale)
        return ssd_step_torch(r["q"], r["k"], r["v"], r["dt"], r["A"], r["D"], state)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self._fused = None  # (key, [gate; up] weight) for frozen_projections
        self.frozen_projections = False  # as OryxMixer's: a compiled no-grad call reads the cached [gate; up]

    def forward(self, x):
        if self.frozen_projections and self._fused is not None and not torch.is_grad_enabled():
            gate, up = F.linear(x, self._fused[1]).chunk(2, dim=-1)  # one matmul for both
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_add(self, x, residual):
        """residual + forward(x); on the CPU path (cpu_linear) one product for gate and up, the sum taken in the
        down projection's epilogue."""
        if not cpu_linear.applies(x):
            return residual + self(x)
        gate_up, down = self._packed_weights()
        gate, up = cpu_linear.linear(x, gate_up).chunk(2, dim=-1)
        return cpu_linear.linear_add(F.silu(gate).mul_(up), down, residual)

    def _fused_weight(self) -> torch.Tensor:
        self._fused = concatenated_weights(self._fused, (self.gate_proj.weight, self.up_proj.weight))
        return self._fused[1]

    def _packed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[gate; up] and down reordered for cpu_linear, keyed by the three weights' storages and versions; the
        [gate; up] concatenation they are made from is not kept (it would hold the MLP's weights a third time)."""
        weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        key = tuple((w.data_ptr(), w._version) for w in weights)
        cached = getattr(self, "_packed", None)
        if cached is None or cached[0] != key:
            self._packed = None  # the old copies go before the new ones are made
            gate_up = torch.cat(weights[:2]).detach()
            cached = self._packed = (key, cpu_linear.reorder(gate_up), cpu_linear.reorder(weights[2]))
        return cached[1], cached[2]

    def train(self, mode: bool = True):
        if mode:  # as OryxMixer.train: training may change the weights without bumping their versions
            self._fused = None
            self._packed = None
        return super().train(mode)


class StagedStates:
    """GDN states that a forward call's layers advance without any token reading them (OryxMixer.
    _advance_state_alone), computed together once the last layer has run: each layer writes its chunked keys,
    values and gates into its own slot of one buffer, and finish() runs grouped_final_state with the layers folded
    into the batch, a few calls for all layers. The matrix products then have batches several layers wide, which
    the CPU's threads share and whose per-call costs are paid a few times instead of per layer; at that width the
    chunks are chained by their transitions' factors (`factored`: a third fewer multiply-adds, in sequential
    products that a layer's few heads alone would leave too small)."""

    GROUP_ROWS = 32  # sequence-heads per grouped_final_state call

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.buffer = None
        self.states = []     # per staged layer, its cache's state [B, Hkv, G, K, V] (a view), in slot order
        self.layout = None   # (K, NT) of every staged layer

    def slot(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The next layer's slot of `shape` (every staged layer's, as one config and one call give them)."""
        if self.buffer is None:
            self.buffer = like.new_empty(self.n_layers, *shape)
        if tuple(self.buffer.shape[1:]) != tuple(shape) or len(self.states) == self.n_layers:
            raise ValueError(f"staged states: a slot of shape {list(shape)}, the buffer holds "
                             f"{len(self.states)} of {list(self.buffer.shape)}")
        return self.buffer[len(self.states)]

    def add(self, state: torch.Tensor, K: int, NT: int) -> None:
        """Records that the last slot is filled; `state` [B, Hkv, G, K, V] (the G copies equal) takes its final
        state in finish()."""
        if self.layout not in (None, (K, NT)):
            raise ValueError(f"staged states: layout {(K, NT)} after {self.layout}")
        self.layout = (K, NT)
        self.states.append(state)

    def finish(self) -> None:
        """Every staged layer's final state into its cache, computed from the state each held before the call."""
        n = len(self.states)
        if not n:
            return
        K, NT = self.layout
        B, Hkv = self.states[0].shape[:2]
        initial = torch.stack([state[:, :, 0] for state in self.states])             # [n, B, Hkv, K, V]
        # layers in groups of about GROUP_ROWS sequence-heads: on two cores, 16 to 32 ran fastest, a whole 30-layer
        # model's 90 (one call) a fifth slower
        groups = -(-n * B * Hkv // self.GROUP_ROWS)
        size = -(-n // groups)
        for start in range(0, n, size):
            stop = min(n, start + size)
            final = grouped_final_state(self.buffer[start:stop].flatten(0, 1), K, NT, initial[start:stop].flatten(0, 1),
                                        key_norm_eps=L2NORM_EPS, factored=True).unflatten(0, (stop - start, B))
            for state, layer_final in zip(self.states[start:stop], final):
                state.copy_(layer_final[:, :, None].expand_as(state))
        self.states, self.buffer, self.layout = [], None, None


class OryxLayer(nn.Module):
    """Pre-norm residual block: h = x + Mixer(RMSNorm(x)); y = h + MLP(RMSNorm(h))."""

    def __init__(self, cfg: OryxConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = OryxMixer(cfg)
        if cfg.mlp_hidden:
            self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)
        else:
            self.mlp = None

    def _mlp(self, h):
        return h if self.mlp is None else self.mlp.forward_add(self.mlp_norm(h), h)

    def forward(self, x, plan: AttentionPlan, rope, layer_cache=None, lengths=None, last_only: bool = False,
                staged: StagedStates | None = None):
        """x [B, T, D] -> [B, T, D], or [B, 1, D] (the last token) where the mixer computed only that one
        (`last_only`, OryxMixer.forward); `staged` as OryxMixer.forward's."""
        o = self.mixer(self.attn_norm(x), plan, rope, layer_cache, lengths, last_only=last_only, staged=staged)
        return self._mlp((x if o.shape[1] == x.shape[1] else x[:, -1:]) + o)

    def step(self, x, modes, rope, layer_cache, position, attend):
        return self._mlp(x + self.mixer.step(self.attn_norm(x), modes, rope, layer_cache, position, attend))


# ----- the model -----
class OryxModel(nn.Module):
    def __init__(self, cfg: OryxConfig, seed: int | None = 0):
        """An Oryx model; `seed` fills it as `oryx init` would (None: leave it for load_params)."""
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(OryxLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if seed is not None:
            self.load_params(init_params(cfg, seed))

    # -- weights --
    @classmethod
    def from_checkpoint(cls, path, dtype=None, device="cpu") -> "OryxModel":
        """Loads a checkpoint directory; dtype None keeps the stored float dtype."""
        ckpt = load_checkpoint(path)
        if ckpt.quantization is not None:
            raise ValueError(f"{path}: quantized checkpoints ({ckpt.quantization}) are MLX-only; "
                             f"convert to float first")
        dtype = resolve_dtype(dtype if dtype is not None else DTYPES.get(ckpt.dtype, torch.float32))
        model = cls(ckpt.config, seed=None).to(dtype)
        model.load_params(ckpt.params)
        return model.to(device)

    def load_params(self, params: dict[str, np.ndarray]) -> None:
        """Copies spec-named numpy arrays (bf16 through ml_dtypes, bit-exact) into the parameters."""
        own = dict(self.named_parameters())
        missing, extra = sorted(set(own) - set(params)), sorted(set(params) - set(own))
        if missing or extra:
            raise ValueError(f"params: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
        with torch.no_grad():
            for name, p in own.items():
                value = numpy_to_torch(params[name])
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"params: tensor {name!r} has shape {list(value.shape)}, "
                                     f"the model needs {list(p.shape)}")
                p.copy_(value)

    def params_numpy(self) -> dict[str, np.ndarray]:
        return {name: torch_to_numpy(p) for name, p in self.named_parameters()}

    def save(self, path, dtype: str | None = None, tokenizer_json: str | None = None) -> Path:
        return save_checkpoint(path, self.cfg, self.params_numpy(), dtype=dtype, tokenizer_json=tokenizer_json)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def make_cache(self, batch: int = 1, capacity: int | None = None, with_kv: bool = True) -> OryxCache:
        """An empty cache for `batch` sequences of up to `capacity` tokens (default: the config's max_context)."""
        return OryxCache(self.cfg, batch, capacity or self.cfg.max_context, self.device, self.dtype, with_kv)

    # -- input checks (one-line errors naming the argument) --
    def check_tokens(self, tokens, ndim: int) -> torch.Tensor:
        tokens = torch.as_tensor(tokens)
        if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(f"tokens: expected integer token ids, got {tokens.dtype}")
        if tokens.dim() != ndim:
            raise ValueError(f"tokens: expected {ndim} dimensions ({'[B, T]' if ndim == 2 else '[B]'}), "
                             f"got shape {list(tokens.shape)}")
        # one host sync for tokens on the GPU: an id out of range would index garbage. Inside torch.compile
        # the values are not known at trace time: compiled callers validate at their boundary (`prepare`).
        if tokens.numel() and not torch.compiler.is_compiling():
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.cfg.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"tokens: id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return tokens.to(self.device, torch.long)

    def layer_modes(self, modes, shape: tuple[int, ...]) -> list:
        """Each layer's modes: `modes` broadcastable to [n_layers, *shape] (the convention of every backend:
        a bool, [T] shared by the batch, [B, T], or per layer [L, B, T]; for one step [B] or [L, B])."""
        modes = torch.as_tensor(modes)
        L = self.cfg.n_layers
        if modes.dim() != len(shape) + 1:
            return [modes] * L
        if modes.shape[0] not in (1, L):
            raise ValueError(f"modes: shape {list(modes.shape)} does not broadcast to [n_layers={L}, "
                             f"{', '.join(map(str, shape))}]")
        if modes.shape[0] == 1 or (not torch.compiler.is_compiling() and bool((modes == modes[:1]).all())):
            return [modes[0]] * L  # one plan serves every layer
        return list(modes)

    def check_modes(self, modes, shape: tuple[int, ...], device=None) -> torch.Tensor:
        """modes -> bool [*shape] on `device` (default the model's); accepts a bool, per-token [T]
        (shared by the batch) or the full shape."""
        modes = torch.as_tensor(modes, device=self.device if device is None else device)
        if modes.dtype != torch.bool:
            raise ValueError(f"modes: expected bools (True = attention), got {modes.dtype}")
        if modes.dim() == 0 or tuple(modes.shape) == tuple(shape[1:]):
            return modes.expand(shape)
        if tuple(modes.shape) != tuple(shape):
            want = f"[T] = {list(shape[1:])} or [B, T] = {list(shape)}" if len(shape) == 2 else f"[B] = {list(shape)}"
            raise ValueError(f"modes: shape {list(modes.shape)} does not match the tokens; expected {want}")
        return modes

    # -- forward --
    def prepare(self, tokens, modes, offset: int = 0) -> tuple[torch.Tensor, list[AttentionPlan]]:
        """Checks tokens [B, T] and modes once, outside any compiled region, and builds each layer's
        AttentionPlan with what attention needs (block masks or attention rows): `forward(tokens, plans)`
        then runs without a host sync or a graph break, specialised to the plan's flags."""
        tokens = self.check_tokens(tokens, 2)
        return tokens, [plan.prepare() for plan in self.attention_plans(modes, tuple(tokens.shape), offset)]

    def attention_plans(self, modes, shape: tuple[int, int], offset: int = 0) -> list[AttentionPlan]:
        """One AttentionPlan per layer for modes over tokens of `shape` [B, T] at positions offset..;
        `modes` may already be such a list (or one plan for every layer)."""
        if isinstance(modes, AttentionPlan):
            modes = [modes] * self.cfg.n_layers
        if isinstance(modes, (list, tuple)) and modes and all(isinstance(p, AttentionPlan) for p in modes):
            if len(modes) != self.cfg.n_layers:
                raise ValueError(f"modes: {len(modes)} plans for {self.cfg.n_layers} layers")
            for plan in modes:
                if tuple(plan.modes.shape) != tuple(shape) or plan.q_offset != offset:
                    raise ValueError(f"modes: a plan for shape {list(plan.modes.shape)} at offset {plan.q_offset}, "
                                     f"the tokens need {list(shape)} at offset {offset}")
            return list(modes)
        B, T = shape
        plans = {}  # one AttentionPlan per distinct modes tensor (usually one for every layer)
        per_layer = self.layer_modes(modes, (B, T))
        for modes in per_layer:
            if id(modes) not in plans:
                host_modes = None if modes.is_cuda else self.check_modes(modes, (B, T), device="cpu")
                plans[id(modes)] = AttentionPlan(self.check_modes(modes, (B, T)), offset, host_modes)
        return [plans[id(m)] for m in per_layer]

    def forward(self, tokens, modes, cache: OryxCache | None = None, lengths=None, last_only: bool = False):
        """Logits [B, T, V] for tokens [B, T] under modes (True = attention): a bool, [T], [B, T] or per layer
        [L, B, T], or the plans `prepare` returned. `last_only`: the last token's logits only, [B, 1, V] (a prompt
        read before sampling needs no others, and the vocabulary projection of every token is a fifth of a small
        model's prompt arithmetic); with `lengths`, each row's last real token's.

        With a cache, the tokens continue the cached sequences (prefill): their keys and
        values are appended, conv windows and recurrent states advanced. `lengths` (a sequence of B
        ints, with a ragged cache) right-pads: row b continues by its first lengths[b] tokens only, and
        its cache.position ends at the old length + lengths[b]; logits past them are meaningless.
        """
        tokens = self.check_tokens(tokens, 2)
        B, T = tokens.shape
        offset = 0
        if cache is not None:
            self.check_cache(cache, B, T)
            offset = cache.length
        if lengths is not None:
            if cache is None or not cache.ragged:
                raise ValueError("lengths: right-padded prefill needs a ragged cache (rows at their own positions)")
            if len(lengths) != B or min(lengths) < 1 or max(lengths) > T:
                raise ValueError(f"lengths: expected {B} lengths in [1, {T}], got {list(lengths)}")
            lengths = torch.as_tensor(list(lengths), dtype=torch.long, device=self.device)
        layer_plans = self.attention_plans(modes, (B, T), offset)
        if cache is not None and not any(p.traced for p in layer_plans):
            check_cache_modes(cache, any(p.any_attention for p in layer_plans),
                              any(p.any_recurrent for p in layer_plans))
        rope = self._rope(torch.arange(offset, offset + T, device=self.device))
        x = self.embed(tokens)
        # the states no token of this call reads, computed after the last layer for all layers at once
        staged = StagedStates(len(self.layers)) if cache is not None and lengths is None else None
        for i, layer in enumerate(self.layers):
            x = layer(x, layer_plans[i], rope, None if cache is None else cache.layers[i], lengths,
                      last_only=last_only and i == len(self.layers) - 1, staged=staged)
        if staged is not None:
            staged.finish()
        if cache is not None:
            cache.advance(T)
            if lengths is not None:
                cache.position.copy_(offset + lengths)
        if last_only and lengths is not None:
            x = x[torch.arange(B, device=x.device), lengths - 1][:, None]
        return self.logits(x[:, -1:] if last_only else x)

    def step(self, tokens, modes, cache: OryxCache) -> torch.Tensor:
        """Logits [B, V] for one token per sequence (tokens [B]); modes: a bool, [B] or per layer [L, B]."""
        tokens = self.check_tokens(tokens, 1)
        per_layer = self.layer_modes(modes, tuple(tokens.shape))
        modes = torch.stack([self.check_modes(m, tuple(tokens.shape)) for m in per_layer])  # [L, B]
        self.check_cache(cache, tokens.shape[0], 1)
        attend = bool(modes.any())
        check_cache_modes(cache, attend, not bool(modes.all()))
        logits = self.decode_step(tokens, modes, cache, attend)
        cache.length += 1
        return logits

    def decode_step(self, tokens, modes, cache: OryxCache, attend: bool) -> torch.Tensor:
        """The device part of `step`: no checks, no host syncs, fixed shapes (what a CUDA graph captures).

        modes: bool [B], or per layer [L, B]; attend: whether any layer's token attends.

        Advances cache.position on the device; the caller advances cache.length. The compiled decode
        (generate.decode_and_pick) runs the same pieces: decode_inputs, each layer's step, decode_logits.
        """
        if host_step.applies(self) and not fused_decode_available(cache.position) and not torch.compiler.is_compiling():
            return host_step.decode_step(self, tokens, modes, cache, attend)  # fewer operators, same function
        if fused_norms_apply(self.embed.weight):
            return self._fused_decode_step(tokens, modes, cache, attend)
        x, rope = self.decode_inputs(tokens, cache)
        for i, layer in enumerate(self.layers):
            x = layer.step(x, modes[i] if modes.dim() == 2 else modes, rope, cache.layers[i], cache.position, attend)
        return self.decode_logits(x, cache)

    def _fused_decode_step(self, tokens, modes, cache: OryxCache, attend: bool) -> torch.Tensor:
        """decode_step with the residual stream in fused kernels (kernels/decode_step.py): each residual add
        is one kernel with the RMSNorm that reads its sum (the next sub-block's, the last one's with the final
        norm), the MLP's [gate; up] one matmul and its SiLU-and-multiply one kernel; the mixers' own step.
        Where fused_matvec_applies, each projection is one kernel with its norm before it and the residual add or
        the SiLU-and-multiply after it (kernels/decode_matvec.py): a layer whose mixer runs fused is five kernels."""
        from .kernels.decode_step import add_rms_norm_rows, rms_norm_rows, silu_mul

        def normed(x, pending, norm):  # (x + pending, RMSNorm of it); pending: a sub-block's output not yet added
            if pending is None:
                return x, rms_norm_rows(x, norm.weight, norm.eps)
            return add_rms_norm_rows(x, pending.contiguous(), norm.weight, norm.eps)

        x, rope = self.decode_inputs(tokens, cache)
        x, pending = x.contiguous(), None
        by_matvec = fused_matvec_applies(x)
        if by_matvec:
            from .kernels.decode_matvec import matvec
        for i, layer in enumerate(self.layers):
            row_modes = modes[i] if modes.dim() == 2 else modes
            if by_matvec and pending is None and fused_step_applies(layer.mixer, cache.layers[i]):
                x = layer.mixer._fused_step(x, row_modes, rope, cache.layers[i], cache.position, attend,
                                            norm=layer.attn_norm, residual=x)
            else:
                x, xn = normed(x, pending, layer.attn_norm)
                pending = layer.mixer.step(xn, row_modes, rope, cache.layers[i], cache.position, attend)
            if layer.mlp is not None and by_matvec and pending is None:
                hidden = matvec(x, layer.mlp._fused_weight(), layer.mlp_norm.weight, layer.mlp_norm.eps,
                                silu_mul=True)
                x = matvec(hidden, layer.mlp.down_proj.weight, residual=x)
            elif layer.mlp is not None:
                x, xn = normed(x, pending, layer.mlp_norm)
                pending = layer.mlp.down_proj(silu_mul(F.linear(xn, layer.mlp._fused_weight())))
        cache.position.add_(1)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        if by_matvec and pending is None:  # the final norm and the LM head in one kernel
            return matvec(x, head, self.norm.weight, self.norm.eps)
        x, xn = normed(x, pending, self.norm)
        return F.linear(xn, head)

    def decode_inputs(self, tokens, cache: OryxCache):
        """A decode step's embedded tokens [B, D] and RoPE tables (one row per sequence when the cache is ragged)."""
        if cache.ragged:  # sequences at different positions: one RoPE row per sequence, [B, 1, d]
            rope = self._rope(cache.position)
            rope = None if rope is None else (rope[0][:, None], rope[1][:, None])
        else:
            rope = self._rope(cache.position[:1])
        return self.embed(tokens), rope

    def decode_logits(self, x, cache: OryxCache):
        """A decode step's logits [B, V] from the last layer's output; advances cache.position."""
        cache.position.add_(1)
        return self.logits(x)

    def logits(self, x):
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm(x), head)

    def _rope(self, positions):
        return rope_tables(self.cfg.head_dim, self.cfg.rope_theta, positions) if self.cfg.rope else None

    def check_cache(self, cache: OryxCache, batch: int, new_tokens: int) -> None:
        if cache.cfg != self.cfg:
            raise ValueError("cache: made for another config")
        if cache.batch != batch:
            raise ValueError(f"cache: holds {cache.batch} sequences but the tokens have batch {batch}")
        cache.reserve(new_tokens)


def check_cache_modes(cache: OryxCache, any_attention: bool, any_recurrent: bool) -> None:
    """Refuses tokens in a mode whose part of the cache was dropped."""
    if any_attention and not cache.has_kv:
        raise ValueError(f"modes: attention-mode token at position >= {cache.length} after the KV cache was dropped; "
                         "use the `keep` KV policy for plans that return to attention")
    if any_recurrent and not cache.has_recurrent:
        raise ValueError(f"modes: recurrent-mode token at position >= {cache.length} after the recurrent state was "
                         "dropped; use the `keep` state policy for plans that return to the recurrence")


def fused_decode_available(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


# Whether decode steps run each layer's mixer through the fused token kernels (kernels/decode_step.py) where
# fused_step_applies; read at every step, so it may be switched between runs (a captured CUDA graph or a compiled
# step keeps what it was built with; dynamo guards on it). On unless ORYX_FUSED_DECODE=0.
FUSED_DECODE = os.environ.get("ORYX_FUSED_DECODE", "1") == "1"


# Whether the fused decode step (fused_norms_apply) also runs each projection as one matvec kernel with the norm
# before it and the residual add or the MLP's activation after it (kernels/decode_matvec.py), for decode steps of
# at most FUSED_MATVEC_MAX_BATCH sequences (the kernel takes up to decode_matvec.MAX_ROWS); read at every step, as
# FUSED_DECODE. On unless ORYX_FUSED_MATVEC=0. The limit is where it was timed faster: at batch 1 it was, at 8 and
# 32 cuBLAS's products were (bench_fused_decode.py, docs/benchmarks.md); batches in between were not timed.
FUSED_MATVEC = os.environ.get("ORYX_FUSED_MATVEC", "1") == "1"
FUSED_MATVEC_MAX_BATCH = 1


# Whether the fused step's recurrent token kernel runs one program per query head (each repeating its group's state
# update) instead of one per key/value head, at batch sizes where that adds programs (decode_step.split_heads_applies);
# read at every step, as FUSED_DECODE. On unless ORYX_FUSED_SPLIT_HEADS=0.
FUSED_SPLIT_HEADS = os.environ.get("ORYX_FUSED_SPLIT_HEADS", "1") == "1"


def fused_matvec_applies(x: torch.Tensor) -> bool:
    """Whether the fused decode step of the residual stream x [B, D] takes the matvec kernels: FUSED_MATVEC on,
    fused_norms_apply, and B at most FUSED_MATVEC_MAX_BATCH and small enough for one launch to hold every row."""
    if not (FUSED_MATVEC and fused_norms_apply(x)) or x.shape[0] > FUSED_MATVEC_MAX_BATCH:
        return False
    from .kernels.decode_matvec import fused_matvec_applies as fits

    return fits(x.shape[0])


def fused_norms_apply(x: torch.Tensor) -> bool:
    """Whether OryxModel.decode_step runs the residual stream's adds, norms and the MLP's activation as fused
    kernels: FUSED_DECODE on, CUDA tensors (or the Triton interpreter), outside autograd and outside torch.compile
    (whose inductor fuses them itself, and around them more)."""
    return (FUSED_DECODE and fused_decode_available(x) and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def fused_step_applies(mixer: OryxMixer, layer_cache: LayerCache) -> bool:
    """Whether OryxMixer.step runs the fused kernels: FUSED_DECODE on, CUDA tensors (or the Triton interpreter),
    a mixer (GDN or Mamba-2) whose modes read the same key and value projections (sharing "kv" or "qkv", or "kv-proj"
    with the recurrence's own convs of them; not "none", whose recurrence has projections of its own), the output
    norm per head, conv width >= 2, heads of >= 16 (the attention kernel's matrix products), and the parts of the
    cache it writes."""
    cfg = mixer.cfg
    return (FUSED_DECODE and not mixer.separate_kv and cfg.o_norm_grouping == "head"
            and cfg.conv_width >= 2 and min(cfg.head_dim, cfg.v_head_dim) >= 16
            and (layer_cache.keys is not None or layer_cache.recurrent is not None)
            and fused_decode_available(layer_cache.conv["k"]))


def grouped_recurrence_applies(q: torch.Tensor) -> bool:
    """Whether the parallel form's GDN recurrence may run once per key/value head group: the torch chunked path
    (CPU, no Triton interpreter), outside autograd and torch.compile."""
    return not (fused_decode_available(q) or torch.is_grad_enabled() or torch.compiler.is_compiling())


# ----- numpy <-> torch, bf16 bit-exact -----
def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def numpy_to_torch(arr: np.ndarray) -> torch.Tensor:
    arr = np.asarray(arr)
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(np.array(arr.view(np.int16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(arr))


def torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy().copy()

