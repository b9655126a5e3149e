"""The decode step on the CPU, in as few operators as the function allows.

One token through a small model is a few thousand tiny operators, and on a CPU each costs
microseconds of dispatch, and a wake-up of the thread pool where it runs in parallel: the
operator count, not the arithmetic, decides the speed. `decode_step` computes what
`OryxModel.decode_step` computes (the generic step form in model.py, which also runs on CUDA
and under CUDA graphs) for fp32 models on the CPU:

- one matmul for every input projection (the mixer's cached concatenation), sliced into views;
- RMSNorm and GDN's L2 norms of q and k from `vector_norm` (one fused reduction): x·rsqrt(‖x‖²/d + ε)·w
  and x·rsqrt(‖x‖² + ε), with the recurrence's scale s folded in as rsqrt(‖x‖²/s² + ε/s²). Torch's CPU
  `rms_norm` is a chain of small operators, slower at these sizes;
- a depthwise conv's output as one `vecdot` of its window with the taps;
- a conv that is the identity (last tap 1, others 0, no bias, no activation: every Llama import)
  only shifts its window;
- RoPE as x·cos + (x's halves swapped)·sin, on the queries and keys together when they are
  adjacent in the projection's output;
- the recurrence on the state viewed per key/value head group [B, Hkv, G, K, V]: keys, values and
  gates broadcast over a group's G query heads instead of being repeated to them;
- attention as one SDPA call over the filled part of the KV cache when the sequences share a
  position (sequences at different positions take the masked `decode_attention`);
- the output projection and the MLP's down projection add the residual in their matmul (addmm).

`applies` says when this path runs; everything else takes the generic step.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from oryx_core.reference import L2NORM_EPS

from .attention import decode_attention


def applies(model) -> bool:
    """Whether `decode_step` computes this model's step: fp32 on the CPU, without autograd, with both modes
    reading k_proj and v_proj (sharing "kv", or "kv-proj": the recurrence through convolutions of its own)."""
    return (model.cfg.sharing in ("kv", "kv-proj") and model.embed.weight.device.type == "cpu"
            and model.embed.weight.dtype == torch.float32 and not torch.is_grad_enabled())


class LayerConstants:
    """What a mixer's step reads besides its weights, derived once from the parameters: the fused
    projection's column ranges, which convs are the identity, the recurrence's decay rate and the
    L2 norms' weights."""

    def __init__(self, mixer):
        cfg = mixer.cfg
        self.offsets, start = {}, 0
        for name in mixer.projection_order:
            size = getattr(mixer, name).out_features
            self.offsets[name] = (start, start + size)
            start += size
        self.identity = {name: conv.is_identity() for name, conv in recurrent_and_shared_convs(mixer)}
        with torch.no_grad():
            self.A = -torch.exp(mixer.A_log.detach().float())
            d = cfg.head_dim
            # keys x·rsqrt(Σx² + ε); queries scale·x·rsqrt(Σx² + ε) = x·rsqrt(Σx²/scale² + ε/scale²)
            self.k_l2 = (eps_tensor(L2NORM_EPS), 1.0)
            self.q_l2 = (eps_tensor(L2NORM_EPS / cfg.gdn_scale ** 2), 1.0 / cfg.gdn_scale ** 2)
            self.taps = {name: conv.tap_rows() for name, conv in recurrent_and_shared_convs(mixer)
                         if not self.identity[name]}                                   # [W, C]


def recurrent_and_shared_convs(mixer) -> list:
    """(cache window name, conv) of every conv the step runs."""
    convs = [("k", mixer.conv_k), ("v", mixer.conv_v), ("q", mixer.conv_q)]
    if mixer.recurrent_kv_convs:
        convs += [("k_rec", mixer.conv_k_rec), ("v_rec", mixer.conv_v_rec)]
    return convs


def layer_constants(mixer) -> LayerConstants:
    """The mixer's LayerConstants, rebuilt when any parameter they come from changes."""
    params = [mixer.A_log] + [t for _, conv in recurrent_and_shared_convs(mixer)
                              for t in (conv.weight, conv.bias) if t is not None]
    key = tuple((p.data_ptr(), p._version) for p in params)
    cached = getattr(mixer, "_host_step_constants", None)
    if cached is None or cached[0] != key:
        cached = (key, LayerConstants(mixer))
        mixer._host_step_constants = cached
    return cached[1]


def decode_step(model, tokens, modes, cache, attend: bool) -> torch.Tensor:
    """OryxModel.decode_step on the CPU: logits [B, V] for tokens [B]; modes bool [B] or per layer [L, B].
    Advances cache.position; the caller advances cache.length."""
    rope = model._rope(cache.position if cache.ragged else cache.position[:1])
    if rope is not None:
        rope = (rope[0][:, None], rope[1][:, None])          # [B or 1, 1, d]: broadcast over heads
    slot = None if cache.ragged else cache.length          # where every sequence's token goes, if shared
    x = model.embed(tokens)
    for i, layer in enumerate(model.layers):
        layer_modes = modes[i] if modes.dim() == 2 else modes
        x = layer_step(layer, x, layer_modes, rope, cache.layers[i], cache.position, slot, attend)
    cache.position.add_(1)
    return model.logits(x)


def layer_step(layer, x, modes, rope, layer_cache, position, slot, attend: bool):
    """One layer, x [B, D] -> [B, D]."""
    D = x.shape[-1]
    xn = rms_norm(x, layer.attn_norm)
    h = mixer_step(layer.mixer, xn, x, modes, rope, layer_cache, position, slot, attend)
    mlp = layer.mlp
    if mlp is None:
        return h
    hn = rms_norm(h, layer.mlp_norm)
    y = F.silu(F.linear(hn, mlp.gate_proj.weight)).mul_(F.linear(hn, mlp.up_proj.weight))
    return torch.addmm(h, y, mlp.down_proj.weight.t())


def rotate(x, rope):
    """RoPE on x [B, n, d] (rotate-half) with tables [B or 1, 1, d] from rope_tables: the same arithmetic
    as attention.apply_rope."""
    cos, sin = rope
    swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin)


def rms_norm(x, norm):
    """norm (an RMSNorm module) on x [B, D]: x·rsqrt(‖x‖²/D + ε)·w, the formula of F.rms_norm."""
    return l2_normalize(x, (eps_tensor(norm.eps), 1.0 / x.shape[-1])).mul_(norm.weight)


@functools.lru_cache(maxsize=None)
def eps_tensor(eps: float) -> torch.Tensor:
    """eps as a CPU fp32 scalar tensor (addcmul's first operand), made once per value."""
    return torch.tensor(float(eps))


def l2_normalize(x, eps_and_value):
    """x·rsqrt(value·‖x‖² + ε) over the last dim; (ε, value) from LayerConstants (k_l2 or q_l2)."""
    eps, value = eps_and_value
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.addcmul(eps, n, n, value=value).rsqrt_()


def conv_step(conv, x, window, taps):
    """One token x [B, C] through a depthwise causal conv; shifts `window` [B, W-1, C] in place.
    taps: the conv's weight as [W, C] (LayerConstants.taps), or None where the conv is the identity."""
    full = torch.cat([window, x.unsqueeze(1)], dim=1)                               # [B, W, C]
    window.copy_(full[:, 1:])
    if taps is None:
        return x
    out = torch.linalg.vecdot(full, taps, dim=1)
    if conv.bias is not None:
        out = out + conv.bias
    return F.silu(out) if conv.activation == "silu" else out


def mixer_step(mixer, xn, x, modes, rope, layer_cache, position, slot, attend: bool):
    """x + mixer(xn) for one token per sequence (xn, x [B, D])."""
    cfg, c = mixer.cfg, layer_constants(mixer)
    B = xn.shape[0]
    H, Hkv, d, dv, G = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim, cfg.group_size
    recurrent, has_kv = layer_cache.recurrent is not None, layer_cache.keys is not None
    attention = attend or not recurrent   # with the state dropped every token attends (the caller checked)
    order = mixer.projection_order
    first = c.offsets[order[0 if attention else mixer._shared_rows[0]]][0]
    last = c.offsets[order[-1 if recurrent else mixer._shared_rows[1] - 1]][1]
    proj = F.linear(xn, mixer._fused_weight()[first:last])                           # [B, N]
    names = [name for name in order if first <= c.offsets[name][0] < last]
    parts = dict(zip(names, proj.split([c.offsets[name][1] - c.offsets[name][0] for name in names], dim=1)))
    part = parts.__getitem__

    taps = c.taps.get
    k = conv_step(mixer.conv_k, part("k_proj"), layer_cache.conv["k"], taps("k"))
    v = conv_step(mixer.conv_v, part("v_proj"), layer_cache.conv["v"], taps("v"))
    q = keys = None
    if rope is None:
        q, keys = part("q_attn").view(B, H, d) if attention else None, k.view(B, Hkv, d)
    elif attention and c.identity["k"] and c.offsets["q_attn"][1] == c.offsets["k_proj"][0]:
        rotated = rotate(proj[:, c.offsets["q_attn"][0] - first:c.offsets["k_proj"][1] - first].view(B, H + Hkv, d),
                         rope)                                                       # queries and keys at once
        q, keys = rotated[:, :H], rotated[:, H:]
    else:
        q = rotate(part("q_attn").view(B, H, d), rope) if attention else None
        keys = rotate(k.view(B, Hkv, d), rope) if has_kv else None
    if has_kv:
        if slot is None:  # each sequence b at its own position[b]
            rows = torch.arange(B)
            layer_cache.keys[rows, :, position] = keys
            layer_cache.values[rows, :, position] = v.view(B, Hkv, dv)
        else:
            layer_cache.keys[:, :, slot] = keys
            layer_cache.values[:, :, slot] = v.view(B, Hkv, dv)
    o_rec = o_attn = None
    if recurrent:
        q_rec = conv_step(mixer.conv_q, part("q_rec"), layer_cache.conv["q"], taps("q"))
        if mixer.recurrent_kv_convs:  # the recurrence's own convs of the shared projections
            k = conv_step(mixer.conv_k_rec, part("k_proj"), layer_cache.conv["k_rec"], taps("k_rec"))
            v = conv_step(mixer.conv_v_rec, part("v_proj"), layer_cache.conv["v_rec"], taps("v_rec"))
        state = layer_cache.recurrent.view(B, Hkv, G, d, dv)
        if cfg.mixer == "gdn":
            decay = torch.exp(c.A * F.softplus(part("a_proj") + mixer.dt_bias))      # [B, Hkv]
            beta = torch.sigmoid(part("b_proj"))
            qn = l2_normalize(q_rec.view(B, Hkv, G, 1, d), c.q_l2)
            kn = l2_normalize(k.view(B, Hkv, 1, 1, d), c.k_l2)
            state.mul_(decay.view(B, Hkv, 1, 1, 1))
            correction = (v.view(B, Hkv, 1, 1, dv) - torch.matmul(kn, state)).mul_(beta.view(B, Hkv, 1, 1, 1))
            state.addcmul_(kn.view(B, Hkv, 1, d, 1), correction)
            o_rec = torch.matmul(qn, state).view(B, H, dv)
        else:
            dt = F.softplus(part("dt_proj") + mixer.dt_bias)                          # [B, Hkv]
            state.mul_(torch.exp(c.A * dt).view(B, Hkv, 1, 1, 1))
            state.addcmul_((dt.view(B, Hkv, 1) * k.view(B, Hkv, d)).view(B, Hkv, 1, d, 1), v.view(B, Hkv, 1, 1, dv))
            o_rec = torch.matmul(q_rec.view(B, Hkv, G, 1, d), state).view(B, Hkv, G, dv)
            o_rec = torch.addcmul(o_rec, mixer.D_skip.view(Hkv, 1, 1), v.view(B, Hkv, 1, dv)).view(B, H, dv)
    if attention:
        scale = d ** -0.5
        if slot is None:
            o_attn = decode_attention(q, layer_cache.keys, layer_cache.values, position, scale)
        else:
            o_attn = F.scaled_dot_product_attention(
                q[:, :, None], layer_cache.keys[:, :, :slot + 1], layer_cache.values[:, :, :slot + 1], scale=scale,
                enable_gqa=H != Hkv)[:, :, 0]                                        # [B, H, dv]
    if o_attn is None:
        o = o_rec
    elif o_rec is None:
        o = o_attn
    else:
        o = torch.where(modes.view(B, 1, 1), o_attn, o_rec)
    if mixer.g_proj is None and mixer.o_norm is None:
        return torch.addmm(x, o.reshape(B, H * dv), mixer.o_proj.weight.t())
    gate = {"g_proj": part("g_proj")[:, None]} if mixer.g_proj is not None else {}
    return x + mixer._output(o[:, None], gate, x.dtype)[:, 0]
