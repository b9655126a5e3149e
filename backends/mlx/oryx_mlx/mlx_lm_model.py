"""The model module mlx-lm runs for an exported Oryx directory; self-contained (mlx and numpy only).

`oryx export-mlx-lm` copies this file into the directory as `oryx_mlx_lm.py` and names it in
config.json ("model_file"); mlx-lm (checked with 0.32.2) builds the model from this file's
`Model` and `ModelArgs` when loaded with `mlx_lm.load(path, trust_remote_code=True)`. Nothing
here imports Oryx, so the directory runs wherever mlx-lm does. It computes the function of
`oryx_core.reference` (and of oryx_mlx.model, which is the faster implementation Oryx itself
uses): the recurrences run token by token in plain MLX, no Metal kernels.

mlx-lm calls `model(tokens, cache=cache)` without modes, so the export fixes a mode plan
(config.json "oryx_plan", default "attention"), resolved over absolute positions. Only plans
that decide a token's mode from its position alone are accepted: attention, recurrent,
every:K:C and explicit spans ("A:0-512,R:512-"). `model.plan = parse_plan(text)` changes it.

Every token appends its key and value to the cache and advances the recurrent state, whatever
its mode. The recurrent state cannot be rolled back, so the cache reports itself not trimmable
(mlx_lm.server then reuses a cached prompt only when it is a prefix of the new one).
"""
# No `from __future__ import annotations`: mlx-lm executes this file without registering it in
# sys.modules, and dataclasses then cannot resolve string annotations.
import dataclasses
import re
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

L2NORM_EPS = 1e-6  # inside the square root, as in the reference
_SPAN = re.compile(r"^([AR]):(\d+)-(\d*)$")


# ----- the mode plan (the positional kinds of oryx_core.plan) -----
def parse_plan(text: str) -> tuple:
    """("attention",) | ("recurrent",) | ("every", k, chunk) | ("spans", ((is_attention, start, end|None), ...))."""
    s = str(text).strip()
    low = s.lower()
    if low in ("a", "attention", "all-attention"):
        return ("attention",)
    if low in ("r", "recurrent", "all-recurrent"):
        return ("recurrent",)
    if low.startswith("every:"):
        parts = low.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit() or int(parts[1]) < 1 or int(parts[2]) < 1:
            raise ValueError(f"oryx_plan {s!r}: expected every:K:CHUNK with positive integers")
        return ("every", int(parts[1]), int(parts[2]))
    spans, expected = [], 0
    for piece in s.split(","):
        m = _SPAN.match(piece.strip())
        if m is None or int(m.group(2)) != expected or (spans and spans[-1][2] is None):
            raise ValueError(f"oryx_plan {s!r}: mlx-lm gives no prompt or final length, so the plan must decide each "
                             "token's mode from its position (attention, recurrent, every:K:C or spans A:0-8,R:8-)")
        end = int(m.group(3)) if m.group(3) else None
        spans.append((m.group(1) == "A", int(m.group(2)), end))
        expected = end
    return ("spans", tuple(spans))


def plan_modes(plan: tuple, start: int, length: int) -> np.ndarray:
    """Boolean [length]: True where the token at position start + i runs in attention mode."""
    t = np.arange(start, start + length)
    if plan[0] in ("attention", "recurrent"):
        return np.full(length, plan[0] == "attention")
    if plan[0] == "every":
        return (t // plan[2]) % plan[1] == 0
    modes = np.zeros(length, dtype=bool)
    for is_attention, begin, end in plan[1]:
        modes[(t >= begin) & ((t < end) if end is not None else True)] = is_attention
    last_end = plan[1][-1][2]
    if last_end is not None and start + length > last_end:
        raise ValueError(f"oryx_plan covers positions 0-{last_end}; the sequence reaches {start + length}")
    return modes


# ----- configuration -----
@dataclass
class ModelArgs:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    value_head_dim: int = None
    mlp_hidden: int = 0
    norm_eps: float = 1e-5
    rope: bool = True
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    mixer: str = "gdn"
    conv_width: int = 4
    max_context: int = 2048
    conv_bias: bool = False
    conv_activation: str = None
    gate_before_norm: bool = False
    o_norm_grouping: str = "head"
    output_norm: bool = True
    output_gate: bool = True
    recurrent_scale: float = None
    sharing: str = "kv"  # "kv-proj": the recurrence reads k_proj/v_proj through convs of its own
    oryx_plan: str = "attention"
    model_type: str = "oryx"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in known})

    @property
    def v_head_dim(self) -> int:
        return self.value_head_dim or self.head_dim

    @property
    def conv_act(self) -> str:
        if self.conv_activation is not None:
            return self.conv_activation
        return "silu" if self.mixer == "gdn" else "none"

    @property
    def gdn_scale(self) -> float:
        return self.head_dim ** -0.5 if self.recurrent_scale is None else float(self.recurrent_scale)


# ----- the cache mlx-lm drives -----
class OryxLayerCache:
    """One layer's keys and values (RoPE applied), conv windows and float32 recurrent state."""

    def __init__(self):
        self.keys = self.values = None  # [B, Hkv, S, d], [B, Hkv, S, dv]
        # the last W-1 inputs of the k, v, q_rec convs (and with sharing "kv-proj" of the recurrence's own k, v
        # convs): [B, W-1, C] each
        self.windows = None
        self.recurrent = None  # [B, Hkv, d, dv] float32
        self.offset = 0

    @property
    def state(self):
        arrays = [self.keys, self.values, self.recurrent] + list(self.windows or [])
        return [a for a in arrays if a is not None]

    @state.setter
    def state(self, arrays):
        self.keys, self.values, self.recurrent, *windows = arrays
        self.windows = windows or None
        self.offset = 0 if self.keys is None else self.keys.shape[2]

    @property
    def meta_state(self):
        return ""

    @meta_state.setter
    def meta_state(self, value):
        pass

    def is_trimmable(self) -> bool:
        return False  # the recurrent state has no way back to an earlier token

    def trim(self, n: int) -> int:
        return 0

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


# ----- layers -----
def _silu(x):
    return x * mx.sigmoid(x)


def _softplus(x):
    return mx.logaddexp(x, 0.0)


def _l2_normalize(x):
    x = x.astype(mx.float32)
    return x * mx.rsqrt((x * x).sum(-1, keepdims=True) + L2NORM_EPS)


def _rms_norm(x, weight, eps):
    x32 = x.astype(mx.float32)
    return (x32 * mx.rsqrt((x32 * x32).mean(-1, keepdims=True) + eps)).astype(x.dtype) * weight


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = mx.ones((width,))
        self.eps = eps

    def __call__(self, x):
        return _rms_norm(x, self.weight, self.eps)


class CausalConv(nn.Module):
    """Depthwise causal conv over time, weight [C, W] (last tap = current token)."""

    def __init__(self, channels: int, width: int, bias: bool):
        super().__init__()
        self.weight = mx.zeros((channels, width))
        if bias:
            self.bias = mx.zeros((channels,))

    def __call__(self, x, window, activation: str):
        """x [B, T, C], window [B, W-1, C] (earlier inputs) -> (out [B, T, C], the new window)."""
        W, T = self.weight.shape[1], x.shape[1]
        padded = mx.concatenate([window.astype(x.dtype), x], axis=1)
        out = sum(padded[:, j:j + T] * self.weight[:, j] for j in range(W))
        if "bias" in self:
            out = out + self.bias
        return (_silu(out) if activation == "silu" else out), padded[:, padded.shape[1] - (W - 1):]


def _rope(x, cos, sin):
    """Rotate-half RoPE; x [B, heads, T, d], cos/sin [T, d/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Mixer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        D, H, Hkv, d, dv = args.d_model, args.n_heads, args.n_kv_heads, args.head_dim, args.v_head_dim
        self.q_attn = nn.Linear(D, H * d, bias=False)
        self.q_rec = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, Hkv * d, bias=False)
        self.v_proj = nn.Linear(D, Hkv * dv, bias=False)
        self.o_proj = nn.Linear(H * dv, D, bias=False)
        if args.output_gate:
            self.g_proj = nn.Linear(D, H * dv, bias=False)
        if args.output_norm:
            self.o_norm = RMSNorm(dv if args.o_norm_grouping == "head" else H * dv, args.norm_eps)
        self.conv_k = CausalConv(Hkv * d, args.conv_width, args.conv_bias)
        self.conv_v = CausalConv(Hkv * dv, args.conv_width, args.conv_bias)
        self.conv_q = CausalConv(H * d, args.conv_width, args.conv_bias)
        if args.sharing == "kv-proj":
            self.conv_k_rec = CausalConv(Hkv * d, args.conv_width, args.conv_bias)
            self.conv_v_rec = CausalConv(Hkv * dv, args.conv_width, args.conv_bias)
        if args.mixer == "gdn":
            self.a_proj = nn.Linear(D, Hkv, bias=False)
            self.b_proj = nn.Linear(D, Hkv, bias=False)
        else:
            self.dt_proj = nn.Linear(D, Hkv, bias=False)
            self.D_skip = mx.ones((Hkv,))
        self.A_log = mx.zeros((Hkv,))
        self.dt_bias = mx.zeros((Hkv,))

    def __call__(self, xn, modes, rope, cache: OryxLayerCache):
        a = self.args
        B, T, _ = xn.shape
        H, Hkv, d, dv, G = a.n_heads, a.n_kv_heads, a.head_dim, a.v_head_dim, a.n_heads // a.n_kv_heads
        own_kv = a.sharing == "kv-proj"
        windows = cache.windows if cache is not None and cache.windows is not None else \
            [mx.zeros((B, a.conv_width - 1, c), xn.dtype)
             for c in (Hkv * d, Hkv * dv, H * d) + ((Hkv * d, Hkv * dv) if own_kv else ())]
        k_in, v_in = self.k_proj(xn), self.v_proj(xn)
        k, wk = self.conv_k(k_in, windows[0], a.conv_act)
        v, wv = self.conv_v(v_in, windows[1], a.conv_act)
        q_rec, wq = self.conv_q(self.q_rec(xn), windows[2], a.conv_act)
        new_windows = [wk, wv, wq]
        k = k.reshape(B, T, Hkv, d)
        v = v.reshape(B, T, Hkv, dv)
        k_rec, v_rec = k, v
        if own_kv:  # the recurrence's keys and values through its own convs
            k_rec, wkr = self.conv_k_rec(k_in, windows[3], a.conv_act)
            v_rec, wvr = self.conv_v_rec(v_in, windows[4], a.conv_act)
            k_rec, v_rec = k_rec.reshape(B, T, Hkv, d), v_rec.reshape(B, T, Hkv, dv)
            new_windows += [wkr, wvr]

        # attention: every token's key and value go to the cache; attention-mode queries read it
        keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if rope is not None:
            keys = _rope(keys, *rope)
        offset = cache.offset if cache is not None else 0
        if cache is not None:
            if cache.keys is not None:
                keys = mx.concatenate([cache.keys, keys], axis=2)
                values = mx.concatenate([cache.values, values], axis=2)
            cache.keys, cache.values = keys, values
        o_attn = None
        if bool(modes.any()):
            q = self.q_attn(xn).reshape(B, T, H, d).transpose(0, 2, 1, 3)
            if rope is not None:
                q = _rope(q, *rope)
            S = keys.shape[2]
            mask = mx.arange(S)[None, :] <= (mx.arange(T) + offset)[:, None]
            o_attn = mx.fast.scaled_dot_product_attention(q, keys, values, scale=d ** -0.5, mask=mask)
            o_attn = o_attn.transpose(0, 2, 1, 3)  # [B, T, H, dv]

        # the recurrence, one token at a time, float32 state per kv head
        state = cache.recurrent if cache is not None and cache.recurrent is not None else \
            mx.zeros((B, Hkv, d, dv), mx.float32)
        qr = q_rec.reshape(B, T, Hkv, G, d).astype(mx.float32)
        kf, vf = k_rec.astype(mx.float32), v_rec.astype(mx.float32)
        A = -mx.exp(self.A_log.astype(mx.float32))
        outs = []
        if a.mixer == "gdn":
            qr, kf = _l2_normalize(qr), _l2_normalize(kf)
            alpha = mx.exp(A * _softplus(self.a_proj(xn).astype(mx.float32) + self.dt_bias))  # [B, T, Hkv]
            beta = mx.sigmoid(self.b_proj(xn).astype(mx.float32))
            for t in range(T):
                kt, vt = kf[:, t], vf[:, t]  # [B, Hkv, d], [B, Hkv, dv]
                state = alpha[:, t, :, None, None] * state
                delta = beta[:, t, :, None] * (vt - (state * kt[..., None]).sum(-2))
                state = state + kt[..., :, None] * delta[..., None, :]
                outs.append(a.gdn_scale * (qr[:, t] @ state))  # [B, Hkv, G, dv]
        else:
            dt = _softplus(self.dt_proj(xn).astype(mx.float32) + self.dt_bias)  # [B, T, Hkv]
            for t in range(T):
                kt, vt = kf[:, t], vf[:, t]
                state = mx.exp(A * dt[:, t])[..., None, None] * state \
                    + (dt[:, t, :, None] * kt)[..., :, None] * vt[..., None, :]
                outs.append(qr[:, t] @ state + (self.D_skip[:, None] * vt)[:, :, None, :])
        o_rec = mx.stack(outs, axis=1).reshape(B, T, H, dv).astype(xn.dtype)
        if cache is not None:
            cache.recurrent, cache.windows = state, new_windows
            cache.offset += T

        o = o_rec if o_attn is None else mx.where(modes[None, :, None, None], o_attn.astype(xn.dtype), o_rec)
        return self.o_proj(self._gated_norm(o, xn))

    def _gated_norm(self, o, xn):
        a = self.args
        B, T, H, dv = o.shape
        gate = _silu(self.g_proj(xn)).reshape(B, T, H, dv) if a.output_gate else None
        if a.o_norm_grouping == "all":
            o = o.reshape(B, T, 1, H * dv)
            gate = None if gate is None else gate.reshape(B, T, 1, H * dv)
        if not a.output_norm:
            y = o if gate is None else o * gate
        elif a.gate_before_norm:
            y = self.o_norm(o if gate is None else o * gate)
        else:
            y = self.o_norm(o) if gate is None else self.o_norm(o) * gate
        return y.reshape(B, T, H * dv)


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def __call__(self, x):
        return self.down_proj(_silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.d_model, args.norm_eps)
        self.mixer = Mixer(args)
        if args.mlp_hidden:
            self.mlp_norm = RMSNorm(args.d_model, args.norm_eps)
            self.mlp = MLP(args.d_model, args.mlp_hidden)

    def __call__(self, x, modes, rope, cache):
        h = x + self.mixer(self.attn_norm(x), modes, rope, cache)
        return h + self.mlp(self.mlp_norm(h)) if "mlp" in self else h


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.plan = parse_plan(args.oryx_plan)
        self.embed = nn.Embedding(args.vocab_size, args.d_model)
        self.layers = [Layer(args) for _ in range(args.n_layers)]
        self.norm = RMSNorm(args.d_model, args.norm_eps)
        if not args.tie_embeddings:
            self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)

    def _rope(self, start: int, length: int):
        a = self.args
        if not a.rope:
            return None
        inv_freq = a.rope_theta ** (-np.arange(0, a.head_dim, 2, dtype=np.float64) / a.head_dim)
        angles = np.arange(start, start + length, dtype=np.float64)[:, None] * inv_freq
        return mx.array(np.cos(angles), mx.float32), mx.array(np.sin(angles), mx.float32)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        if input_embeddings is not None:
            raise ValueError("input_embeddings: an Oryx model takes token ids only")
        offset = cache[0].offset if cache else 0
        T = inputs.shape[1]
        modes = mx.array(plan_modes(self.plan, offset, T))
        rope = self._rope(offset, T)
        x = self.embed(inputs)
        for i, layer in enumerate(self.layers):
            x = layer(x, modes, rope, cache[i] if cache else None)
        x = self.norm(x)
        return self.lm_head(x) if "lm_head" in self else self.embed.as_linear(x)

    def make_cache(self):
        return [OryxLayerCache() for _ in self.layers]
