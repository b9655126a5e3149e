"""Oryx in MLX: the whole model in one file.

Every layer runs each token either with softmax attention or with a linear recurrence
(Gated DeltaNet or Mamba-2), chosen per token by a mode plan. The function computed is
`oryx_core.reference.OryxReference` (float64 NumPy); module attribute names are chosen so
that the parameter tree's flattened names ARE the spec's names (`layers.3.mixer.k_proj.weight`),
so checkpoints load without a name map, and quantised tensors get the names
`<module>.scales` / `<module>.biases` next to `<module>.weight`.

Activations run in the weights' dtype; the gate arithmetic (decays, step sizes) and the
recurrent state run in float32.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from oryx_core.config import OryxConfig

from .cache import LayerCache, make_prompt_cache
from .kernels import gated_delta_recurrence, ssd_recurrence

L2NORM_EPS = 1e-6  # inside the square root, as in the reference


def softplus(x):
    return mx.logaddexp(x, 0.0)


def l2_normalize(x):
    x32 = x.astype(mx.float32)
    return (x32 * mx.rsqrt((x32 * x32).sum(-1, keepdims=True) + L2NORM_EPS)).astype(x.dtype)


class CausalDepthwiseConv(nn.Module):
    """Depthwise causal conv over time; weight [C, W] as in the spec (last tap = current token).

    The caller passes the last W-1 inputs of the previous call (or None at the start) and
    gets back the window to pass next time, so prefill and single steps share one code path.
    """

    def __init__(self, channels: int, width: int, bias: bool):
        super().__init__()
        self.weight = mx.zeros((channels, width))
        if bias:
            self.bias = mx.zeros((channels,))

    def __call__(self, x, window=None):
        B, T, C = x.shape
        W = self.weight.shape[1]
        if window is None:
            window = mx.zeros((B, W - 1, C), dtype=x.dtype)
        padded = mx.concatenate([window.astype(x.dtype), x], axis=1)
        out = sum(padded[:, j:j + T] * self.weight[:, j] for j in range(W))
        if "bias" in self:
            out = out + self.bias
        return out, padded[:, T:]


class OryxMixer(nn.Module):
    """The sequence mixer of one layer: shared K/V/gate/output path, two queries, two readouts."""

    def __init__(self, cfg: OryxConfig):
        super().__init__()
        self.cfg = cfg
        D, H, Hkv, d, dv, W = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim, cfg.conv_width
        self.k_proj = nn.Linear(D, Hkv * d, bias=False)
        self.v_proj = nn.Linear(D, Hkv * dv, bias=False)
        self.q_attn = nn.Linear(D, H * d, bias=False)
        self.q_rec = nn.Linear(D, H * d, bias=False)
        self.o_proj = nn.Linear(H * dv, D, bias=False)
        self.conv_k = CausalDepthwiseConv(Hkv * d, W, cfg.conv_bias)
        self.conv_v = CausalDepthwiseConv(Hkv * dv, W, cfg.conv_bias)
        self.conv_q = CausalDepthwiseConv(H * d, W, cfg.conv_bias)
        if cfg.output_gate:
            self.g_proj = nn.Linear(D, H * dv, bias=False)
        if cfg.output_norm:
            self.o_norm = nn.RMSNorm(dv if cfg.o_norm_grouping == "head" else H * dv, eps=cfg.norm_eps)
        self.A_log = mx.zeros((Hkv,))
        self.dt_bias = mx.zeros((Hkv,))
        if cfg.mixer == "gdn":
            self.a_proj = nn.Linear(D, Hkv, bias=False)
            self.b_proj = nn.Linear(D, Hkv, bias=False)
        else:
            self.dt_proj = nn.Linear(D, Hkv, bias=False)
            self.D_skip = mx.zeros((Hkv,))

    # ----- attention readout -----
    def _attention(self, q, k, v, attention, cache: LayerCache | None):
        """Appends k, v to the cache and attends with the queries of attention-mode tokens.

        q [B,T,H,d], k [B,T,Hkv,d], v [B,T,Hkv,dv]; attention: numpy bool [B,T].
        Returns [B,T,H,dv] (rows of recurrent-mode tokens are don't-care) or None if no
        token of this call is in attention mode.
        """
        cfg = self.cfg
        offset = cache.offset if cache is not None else 0
        rope = (lambda x: mx.fast.rope(x, cfg.head_dim, traditional=False, base=cfg.rope_theta, scale=1.0,
                                       offset=offset)) if cfg.rope else (lambda x: x)
        k = rope(k.transpose(0, 2, 1, 3))
        v = v.transpose(0, 2, 1, 3)
        if cache is not None:
            if cache.kv_dropped:
                if attention.any():
                    raise ValueError(f"modes: attention-mode token at position >= {offset} after the KV cache was "
                                     "dropped; use kv_policy='keep'")
                return None
            k, v = cache.append_kv(k, v)
        if not attention.any():
            return None
        T = attention.shape[1]
        rows = np.flatnonzero(attention.any(axis=0))  # tokens some sequence reads by attention
        q = rope(q.transpose(0, 2, 1, 3))
        scale = cfg.head_dim ** -0.5
        if len(rows) == T:
            mask = "causal" if T > 1 else None
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask).transpose(0, 2, 1, 3)
        visible = (offset + rows)[:, None] >= np.arange(k.shape[2])[None, :]
        o = mx.fast.scaled_dot_product_attention(q[:, :, mx.array(rows)], k, v, scale=scale, mask=mx.array(visible))
        slot = np.zeros(T, dtype=np.int32)
        slot[rows] = np.arange(len(rows))  # each token's row in `o`; recurrent tokens read any row
        return o[:, :, mx.array(slot)].transpose(0, 2, 1, 3)

    # ----- recurrent readout (always updates the state when there is a cache) -----
    def _recurrence(self, x, q, k, v, cache: LayerCache | None):
        """q [B,T,H,d], k [B,T,Hkv,d], v [B,T,Hkv,dv] after conv -> o [B,T,H,dv].

        The kernels take as many key/value heads as query heads, so k, v and the gates are
        repeated per query head; each query head then carries an exact copy of its group's state.
        """
        cfg = self.cfg
        G = cfg.group_size
        rep = (lambda t: mx.repeat(t, G, axis=2)) if G > 1 else (lambda t: t)
        state = cache.recurrent if cache is not None else None
        A = -mx.exp(self.A_log.astype(mx.float32))
        dt_bias = self.dt_bias.astype(mx.float32)
        if cfg.mixer == "gdn":
            log_alpha = A * softplus(self.a_proj(x).astype(mx.float32) + dt_bias)
            beta = mx.sigmoid(self.b_proj(x).astype(mx.float32))
            o, state = gated_delta_recurrence(l2_normalize(q), rep(l2_normalize(k)), rep(v), rep(log_alpha), rep(beta),
                                              state=state, scale=cfg.head_dim ** -0.5)
        else:
            dt = softplus(self.dt_proj(x).astype(mx.float32) + dt_bias)
            rep_heads = (lambda t: mx.repeat(t, G)) if G > 1 else (lambda t: t)
            o, state = ssd_recurrence(q, rep(k), rep(v), rep(dt), rep_heads(A),
                                      rep_heads(self.D_skip.astype(mx.float32)), state=state)
        if cache is not None:
            cache.recurrent = state
        return o

    def _gated_norm(self, o, x):
        """o [B,T,H,dv] -> [B,T,H*dv]: RMSNorm per head (or over all heads) and the SiLU(g) gate."""
        cfg = self.cfg
        B, T, H, dv = o.shape
        if cfg.o_norm_grouping == "all":
            o = o.reshape(B, T, 1, H * dv)
        gate = nn.silu(self.g_proj(x)).reshape(o.shape) if cfg.output_gate else None
        if not cfg.output_norm:
            y = o if gate is None else o * gate
        elif cfg.gate_before_norm:
            y = self.o_norm(o if gate is None else o * gate)
        else:
            y = self.o_norm(o) if gate is None else self.o_norm(o) * gate
        return y.reshape(B, T, H * dv)

    def __call__(self, x, attention, cache: LayerCache | None = None):
        """x [B,T,D] (normed); attention: numpy bool [B,T], True where a token reads by attention."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, Hkv, d, dv = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim
        windows = cache.conv if cache is not None else {}
        new_windows = {}
        act = nn.silu if cfg.conv_act == "silu" else (lambda t: t)
        k, new_windows["k"] = self.conv_k(self.k_proj(x), windows.get("k"))
        v, new_windows["v"] = self.conv_v(self.v_proj(x), windows.get("v"))
        k, v = act(k).reshape(B, T, Hkv, d), act(v).reshape(B, T, Hkv, dv)

        o_attn = self._attention(self.q_attn(x).reshape(B, T, H, d), k, v, attention, cache)
        o_rec = None
        if cache is not None or not attention.all():  # with a cache the state advances whatever the mode
            q_rec, new_windows["q"] = self.conv_q(self.q_rec(x), windows.get("q"))
            o_rec = self._recurrence(x, act(q_rec).reshape(B, T, H, d), k, v, cache)
        if cache is not None:
            cache.conv = new_windows
            cache.offset += T

        if o_rec is None:
            o = o_attn
        elif o_attn is None:
            o = o_rec
        else:
            o = mx.where(mx.array(attention)[:, :, None, None], o_attn, o_rec)
        return self.o_proj(self._gated_norm(o, x))


class MLP(nn.Module):
    """SwiGLU."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class OryxBlock(nn.Module):
    def __init__(self, cfg: OryxConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = OryxMixer(cfg)
        if cfg.mlp_hidden:
            self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
            self.mlp = MLP(cfg.d_model, cfg.mlp_hidden)

    def __call__(self, x, attention, cache=None):
        h = x + self.mixer(self.attn_norm(x), attention, cache)
        return h + self.mlp(self.mlp_norm(h)) if "mlp" in self else h


class OryxModel(nn.Module):
    def __init__(self, cfg: OryxConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = [OryxBlock(cfg) for _ in range(cfg.n_layers)]
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def __call__(self, tokens, modes=True, cache: list[LayerCache] | None = None):
        """Logits [B, T, V] for tokens [B, T].

        modes: bool (numpy, mx or Python) broadcastable to [n_layers, B, T], True = attention
        mode. cache: a prompt cache from `make_cache()`, updated in place (KV, conv windows,
        recurrent state, position), or None for a stateless forward over the whole sequence.
        """
        ids = np.asarray(tokens)
        if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.size == 0:
            raise ValueError(f"tokens: expected integer ids of shape [batch >= 1, time >= 1], got {ids.dtype} "
                             f"{list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            bad = ids.min() if ids.min() < 0 else ids.max()
            raise ValueError(f"tokens: id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})")
        B, T = ids.shape
        L = self.cfg.n_layers
        try:
            attention = np.broadcast_to(np.asarray(modes, dtype=bool), (L, B, T))
        except ValueError:
            raise ValueError(f"modes: shape {list(np.shape(modes))} does not broadcast to "
                             f"[n_layers={L}, batch={B}, time={T}]") from None
        if cache is not None and len(cache) != L:
            raise ValueError(f"cache: has {len(cache)} layers, the model has {L}")
        if cache is not None and cache[0].recurrent is not None and cache[0].recurrent.shape[0] != B:
            raise ValueError(f"cache: holds {cache[0].recurrent.shape[0]} sequences, tokens have batch {B}")
        x = self.embed(mx.array(ids))
        for i, layer in enumerate(self.layers):
            x = layer(x, attention[i], None if cache is None else cache[i])
        x = self.norm(x)
        return self.embed.as_linear(x) if self.cfg.tie_embeddings else self.lm_head(x)

    def make_cache(self) -> list[LayerCache]:
        return make_prompt_cache(self.cfg.n_layers)
