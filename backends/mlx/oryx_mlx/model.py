"""Oryx in MLX: the whole model in one file.

Every layer runs each token either with softmax attention or with a linear recurrence
(Gated DeltaNet or Mamba-2), chosen per token by a mode plan. The function computed is
`oryx_core.reference.OryxReference` (float64 NumPy); module attribute names are chosen so
that the parameter tree's flattened names ARE the spec's names (`layers.3.mixer.k_proj.weight`),
so checkpoints load without a name map, and quantised tensors get the names
`<module>.scales` / `<module>.biases` next to `<module>.weight`.

Activations run in the weights' dtype; the gate arithmetic (decays, step sizes) and the
recurrent state run in float32.

With a prompt cache every token advances the recurrent state whatever its mode, until the
cache's state is dropped (`cache.drop_recurrent`: the plan has no recurrent token left);
from then on a call does no recurrent work and only attention-mode tokens are accepted.
"""
from __future__ import annotations

import functools
import itertools
import operator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from oryx_core.config import OryxConfig
from oryx_core.reference import L2NORM_EPS, rope_angles

from .cache import LayerCache, make_prompt_cache
from .kernels import gated_delta_recurrence, ssd_recurrence
from .kernels.fallback import gated_delta_final_state


def softplus(x):
    return mx.logaddexp(x, 0.0)


def l2_normalize(x):
    x32 = x.astype(mx.float32)
    return (x32 * mx.rsqrt((x32 * x32).sum(-1, keepdims=True) + L2NORM_EPS)).astype(x.dtype)


def rope_table(cfg: OryxConfig, start: int, length: int) -> tuple | None:
    """RoPE factors of positions start..start+length-1 for `apply_rope` (None without RoPE):
    [cos, cos] and [-sin, sin], float32 [length, 2, head_dim/2].

    Built once per model call and shared by every layer's queries and keys: on a CPU,
    mx.fast.rope is no kernel but ~10 ops that recompute the angles at each of its 2·n_layers
    calls (docs/benchmarks.md, "MLX generation on a CPU"). The angles
    come from the reference's float64 formula.
    """
    if not cfg.rope:
        return None
    cos, sin = rope_angles(cfg, np.arange(start, start + length))
    return mx.array(np.stack([cos, cos], axis=-2), mx.float32), mx.array(np.stack([-sin, sin], axis=-2), mx.float32)


def apply_rope(x, table):
    """Rotate-half RoPE of x [..., T, d] with table = rope_table(...) of its T positions:
    out = x·[cos, cos] + (x's halves swapped)·[-sin, sin], on x viewed as [..., T, 2, d/2]
    (the swap is a reversed view, so no split or concatenation)."""
    if table is None:
        return x
    cos, sin = table
    halves = x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)
    return (halves * cos + halves[..., ::-1, :] * sin).reshape(x.shape).astype(x.dtype)


class CausalDepthwiseConv(nn.Module):
    """The parameters of a depthwise causal conv over time: weight [C, W] as in the spec
    (last tap = current token). The mixer runs its three convs as one (`causal_conv`)."""

    def __init__(self, channels: int, width: int, bias: bool):
        super().__init__()
        self.weight = mx.zeros((channels, width))
        if bias:
            self.bias = mx.zeros((channels,))


def causal_conv(x, taps, bias, window, identity: bool = False):
    """Depthwise causal conv of x [B,T,C] with taps [W,C] (the spec's weight [C,W] transposed;
    the last tap is the current token's) and bias [C] or None.

    window: the last W-1 inputs of the previous call (None at the start). Returns the
    output and the window to pass next time, so prefill and single steps share one path.
    identity: the taps are known to be the identity (see `is_identity_conv`): x is returned
    as it is and only the window is kept up to date.
    """
    B, T, C = x.shape
    W = taps.shape[0]
    if identity and T >= W - 1:
        return x, x[:, T - (W - 1):]
    if window is None:
        window = mx.zeros((B, W - 1, C), dtype=x.dtype)
    padded = mx.concatenate([window.astype(x.dtype), x], axis=1)  # [B, T+W-1, C], row-major
    if identity:
        return x, padded[:, T:]
    # frames[b, t, j] = padded[b, t + j]: a strided view instead of W slices (a few graph nodes
    # instead of ~3 per tap, which on a CPU decode step costs more than the arithmetic)
    frames = mx.as_strided(padded, (B, T, W, C), ((T + W - 1) * C, C, C, 1))
    out = (frames * taps).sum(axis=2)
    if bias is not None:
        out = out + bias
    return out, padded[:, T:]


def is_identity_conv(taps, bias, activation: str) -> bool:
    """True when the conv passes its input through: last tap 1, earlier taps 0, no bias, no
    activation ("none"). A Llama imported into the spec has such convs; skipping them saves
    passes over q, k and v that a Transformer never makes."""
    if bias is not None or activation != "none":
        return False
    return bool(mx.all(taps[-1] == 1).item() and mx.all(taps[:-1] == 0).item())


class DerivedArrays:
    """Values built once from some of a module's parameters (fused weights) or its static
    configuration (compiled functions: no sources), each rebuilt when one of its sources is
    replaced. load_weights, update and quantize replace parameter arrays (quantize also
    modules), so identity tells; writing into a parameter array in place is not seen."""

    def __init__(self):
        self._built = {}

    def get(self, key, sources, build):
        """sources: a function returning the source objects, asked again after `build`
        (which may replace them, see `fused_weights`)."""
        current = sources()
        hit = self._built.get(key)
        if hit is None or len(hit[0]) != len(current) or not all(map(operator.is_, hit[0], current)):
            value = build()
            hit = self._built[key] = (sources(), value)
        return hit[1]


LINEAR_ARRAYS = ("weight", "scales", "biases")  # Oryx's projections have no bias


def _linear_kind(module) -> tuple:
    """Projections of one kind can share a matmul (quantised ones: same bits, group size, mode)."""
    if isinstance(module, nn.QuantizedLinear):
        return ("quantized", module.bits, module.group_size, module.mode)
    return ("float",)


def _concatenated_linear(modules: list) -> dict:
    """Weights of bias-free linear maps of one input and one kind, concatenated along the
    output axis (for quantised ones also scales and biases: their groups run along the
    input axis), so each output column is computed as by its own layer."""
    if any("bias" in m for m in modules):
        raise ValueError("fused projections: a projection has a bias, which Oryx's spec does not have")
    join = (lambda arrays: arrays[0]) if len(modules) == 1 else mx.concatenate  # one: no copy
    return {name: join([m[name] for m in modules]) for name in LINEAR_ARRAYS if name in modules[0]}


def _apply_linear(kind: tuple, arrays: dict, x):
    if kind[0] == "quantized":
        _, bits, group_size, mode = kind
        return mx.quantized_matmul(x, arrays["weight"], scales=arrays["scales"], biases=arrays.get("biases"),
                                   transpose=True, group_size=group_size, bits=bits, mode=mode)
    return x @ arrays["weight"].T


def fused_weights(owner: nn.Module, derived: DerivedArrays, names: tuple) -> tuple:
    """(layout, arrays) for `apply_fused`: the linear children of `owner` called `names`,
    grouped by kind, each group's weights concatenated in the order of `names` (built once).
    The layout is static (hashable); the arrays are a list of dicts, one per group.

    Once fused, each module's weights become views of its rows of the fused arrays, so the
    weights are held once (loading or quantising later replaces the views, and the fused
    arrays are built again)."""
    modules = tuple(owner[name] for name in names)

    def sources():
        return modules + tuple(m[key] for m in modules for key in LINEAR_ARRAYS if key in m)

    def fuse():
        groups = {}
        for name, module in zip(names, modules):
            groups.setdefault(_linear_kind(module), []).append((name, module))
        layout = tuple((kind, tuple(name for name, _ in members), tuple(m.weight.shape[0] for _, m in members))
                       for kind, members in groups.items())
        arrays = [_concatenated_linear([m for _, m in members]) for members in groups.values()]
        mx.eval(arrays)
        for members, group_arrays in zip(groups.values(), arrays):
            start = 0
            for _, module in members:
                end = start + module.weight.shape[0]
                module.update({key: a[start:end] for key, a in group_arrays.items()})
                start = end
        mx.eval([[m[key] for key in LINEAR_ARRAYS if key in m] for m in modules])
        return layout, arrays

    return derived.get(names, sources, fuse)


def apply_fused(layout: tuple, arrays: list, x, units: tuple) -> list:
    """One array per unit (a tuple of projection names): its projections' outputs side by side.

    One matmul per group, over the group's rows from the first to the last projection some
    unit needs (a view of the fused weights): order the names so that what a call needs is
    contiguous, and no unneeded rows are computed.
    """
    wanted = {name for unit in units for name in unit}
    where = {}  # name -> (matmul output, first column, end column)
    for (kind, names, widths), group_arrays in zip(layout, arrays):
        used = [i for i, name in enumerate(names) if name in wanted]
        if not used:
            continue
        starts = list(itertools.accumulate(widths, initial=0))
        first, end = starts[used[0]], starts[used[-1] + 1]
        if (first, end) != (0, starts[-1]):
            group_arrays = {key: a[first:end] for key, a in group_arrays.items()}
        y = _apply_linear(kind, group_arrays, x)
        for i in range(used[0], used[-1] + 1):
            where[names[i]] = (y, starts[i] - first, starts[i + 1] - first)
    outputs = []
    for unit in units:
        pieces = [where[name] for name in unit]
        y, start, end = pieces[0][0], pieces[0][1], pieces[-1][2]
        if all(p[0] is y for p in pieces) and all(a[2] == b[1] for a, b in zip(pieces, pieces[1:])):
            outputs.append(y if (start, end) == (0, y.shape[-1]) else y[..., start:end])
        else:
            outputs.append(mx.concatenate([p[0][..., p[1]:p[2]] for p in pieces], axis=-1))
    return outputs


class OryxMixer(nn.Module):
    """The sequence mixer of one layer: shared K/V/gate/output path, two queries, two readouts.

    Its parameters, and its computation in three stages that `OryxBlock` runs: `local`
    (projections, convs, RoPE, the recurrent readout and state update: everything that does
    not read the KV cache), `attention` over the KV cache, and `output`.
    """

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
        if cfg.recurrent_kv_convs:  # sharing "kv-proj": the recurrence reads the shared k/v through convs of its own
            self.conv_k_rec = CausalDepthwiseConv(Hkv * d, W, cfg.conv_bias)
            self.conv_v_rec = CausalDepthwiseConv(Hkv * dv, W, cfg.conv_bias)
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
        self.derived = DerivedArrays()

    # ----- stage 1: everything that does not read the KV cache -----
    def local_weights(self, recurrent: bool, needs_q_attn: bool, readout: bool = True) -> tuple:
        """(static layout, arrays) of the local stage for this call's needs; `readout`: whether a token of the
        call reads the recurrent output (GDN only: when none does, the state advances alone and q_rec is
        projected only for the conv window)."""
        cfg = self.cfg
        gates = ("a_proj", "b_proj") if cfg.mixer == "gdn" else ("dt_proj",)
        readout = readout or cfg.mixer != "gdn"
        queries = recurrent and readout  # q_rec through the conv for every token
        # the conv's channels: the recurrent-only ones first (q_rec's, then with sharing "kv-proj" the recurrence's
        # own keys and values), then the keys and values attention reads; the cache's window keeps this order
        kv_rec = recurrent and cfg.recurrent_kv_convs
        conv_in = ("k_proj", "v_proj") * (2 if kv_rec else 1)
        units = {"conv_in": ("q_rec",) + conv_in if queries else conv_in}
        if cfg.output_gate:
            units["g_proj"] = ("g_proj",)
        if needs_q_attn:
            units["q_attn"] = ("q_attn",)
        if queries:
            units["gates"] = gates
        # one fused matrix serves every call: a recurrent-mode call needs a prefix of this order, an
        # all-attention call a suffix, so neither computes rows it does not use (a state advanced alone
        # projects its gates, and q_rec for the conv window, in calls of their own)
        layout, projections = fused_weights(self, self.derived, self.projection_order())
        conv_modules = ("conv_q",) * queries + ("conv_k_rec", "conv_v_rec") * kv_rec + ("conv_k", "conv_v")
        convs = [self[name] for name in conv_modules]
        conv_names = tuple(c for c in ("weight", "bias") if c in convs[0])
        conv = self.derived.get(("conv", conv_modules), lambda: tuple(c[n] for c in convs for n in conv_names),
                                lambda: {"taps": mx.concatenate([c.weight.T for c in convs], axis=1),
                                         "bias": mx.concatenate([c.bias for c in convs]) if "bias" in conv_names
                                         else None})
        identity = self.derived.get(("conv_identity", conv_modules), lambda: (conv["taps"],),
                                    lambda: is_identity_conv(conv["taps"], conv["bias"], cfg.conv_act))
        arrays = {"projections": projections, "conv": conv}
        if recurrent:
            arrays.update(A_log=self.A_log, dt_bias=self.dt_bias)
            if cfg.mixer == "mamba2":
                arrays["D_skip"] = self.D_skip
        return (tuple(units), tuple(units.values()), layout, identity, recurrent and not queries), arrays

    def projection_order(self) -> tuple:
        gates = ("a_proj", "b_proj") if self.cfg.mixer == "gdn" else ("dt_proj",)
        return (*gates, "q_rec", "k_proj", "v_proj", *(("g_proj",) if self.cfg.output_gate else ()), "q_attn")

    def last_query(self, normed, rope):
        """The attention query [B, H, 1, d] (RoPE applied) of the last token of normed [B, T, D] alone; rope: the
        `rope_table` of the T positions."""
        B, T, _ = normed.shape
        layout, projections = fused_weights(self, self.derived, self.projection_order())
        q = apply_fused(layout, projections, normed[:, -1:], (("q_attn",),))[0]
        table = None if rope is None else tuple(t[-1:] for t in rope)
        return apply_rope(q.reshape(B, 1, self.cfg.n_heads, self.cfg.head_dim).transpose(0, 2, 1, 3), table)

    def local(self, static, arrays, x, window, state, rope):
        """x [B,T,D] (normed) -> (q_attn [B,H,T,d] or None, k [B,Hkv,T,d], v [B,Hkv,T,dv] (RoPE applied),
        o_rec [B,T,H,dv] or None, g or None, conv window, recurrent state); rope: `rope_table` of x's positions."""
        cfg = self.cfg
        unit_names, units, layout, identity_conv, state_only = static
        B, T, _ = x.shape
        H, Hkv, d, dv = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim
        projected = dict(zip(unit_names, apply_fused(layout, arrays["projections"], x, units)))
        recurrent = "gates" in projected or state_only  # state_only: the state advances, no token reads it
        queries = recurrent and not state_only
        window_in = window[..., H * d:] if state_only and window is not None else window
        conv_out, window_out = causal_conv(projected["conv_in"], arrays["conv"]["taps"], arrays["conv"]["bias"],
                                           window_in, identity_conv)
        if state_only:  # q_rec's part of the window: its inputs for the last W - 1 tokens only
            W = arrays["conv"]["taps"].shape[0]
            keep = min(T, W - 1)
            q_window = (mx.zeros((B, W - 1, H * d), dtype=x.dtype) if window is None else window[..., :H * d])
            if keep:
                q_inputs = apply_fused(layout, arrays["projections"], x[:, T - keep:], (("q_rec",),))[0]
                q_window = mx.concatenate([q_window.astype(q_inputs.dtype), q_inputs], axis=1)[:, keep:]
            window_out = mx.concatenate([q_window.astype(window_out.dtype), window_out], axis=-1)
        window = window_out
        if cfg.conv_act == "silu":
            conv_out = nn.silu(conv_out)
        kv_rec = recurrent and cfg.recurrent_kv_convs  # the recurrence's own k, v channels (local_weights' order)
        widths = [H * d] * queries + [Hkv * d, Hkv * dv] * (2 if kv_rec else 1)
        parts = mx.split(conv_out, list(itertools.accumulate(widths[:-1])), axis=-1)
        q_rec = parts[0] if queries else None
        k, v = parts[-2].reshape(B, T, Hkv, d), parts[-1].reshape(B, T, Hkv, dv)
        k_rec, v_rec = (parts[-4].reshape(B, T, Hkv, d), parts[-3].reshape(B, T, Hkv, dv)) if kv_rec else (k, v)
        o_rec = None
        if state_only:
            gates = apply_fused(layout, arrays["projections"], x, (("a_proj", "b_proj"),))[0]
            state = self._final_state(mx.split(gates, [Hkv], axis=-1), k_rec, v_rec, state, arrays)
        elif recurrent:
            gates = mx.split(projected["gates"], [Hkv], axis=-1) if cfg.mixer == "gdn" else (projected["gates"],)
            o_rec, state = self._recurrence(gates, q_rec.reshape(B, T, H, d), k_rec, v_rec, state, arrays)
        q_attn = (apply_rope(projected["q_attn"].reshape(B, T, H, d).transpose(0, 2, 1, 3), rope)
                  if "q_attn" in projected else None)
        return (q_attn, apply_rope(k.transpose(0, 2, 1, 3), rope), v.transpose(0, 2, 1, 3), o_rec,
                projected.get("g_proj"), window, state)

    def _recurrence(self, gates, q, k, v, state, arrays):
        """q [B,T,H,d], k [B,T,Hkv,d], v [B,T,Hkv,dv] after conv; gates: the outputs of a_proj,
        b_proj (GDN) or dt_proj (Mamba-2) -> (o [B,T,H,dv], new state).

        The kernels take as many key/value heads as query heads, so k, v and the gates are
        repeated per query head; each query head then carries an exact copy of its group's state.
        """
        cfg = self.cfg
        G = cfg.group_size
        rep = (lambda t: mx.repeat(t, G, axis=2)) if G > 1 else (lambda t: t)
        A = -mx.exp(arrays["A_log"].astype(mx.float32))
        dt_bias = arrays["dt_bias"].astype(mx.float32)
        if cfg.mixer == "gdn":
            a, b = gates
            log_alpha = A * softplus(a.astype(mx.float32) + dt_bias)
            beta = mx.sigmoid(b.astype(mx.float32))
            return gated_delta_recurrence(l2_normalize(q), rep(l2_normalize(k)), rep(v), rep(log_alpha), rep(beta),
                                          state=state, scale=cfg.gdn_scale)
        dt = softplus(gates[0].astype(mx.float32) + dt_bias)
        rep_heads = (lambda t: mx.repeat(t, G)) if G > 1 else (lambda t: t)
        return ssd_recurrence(q, rep(k), rep(v), rep(dt), rep_heads(A), rep_heads(arrays["D_skip"].astype(mx.float32)),
                              state=state)

    def _final_state(self, gates, k, v, state, arrays):
        """GDN's state after k [B,T,Hkv,d], v [B,T,Hkv,dv] (after conv) and the gates a, b, without the readout,
        computed once per key/value head: the copies of a group's state that its G query heads hold are equal."""
        cfg = self.cfg
        G = cfg.group_size
        a, b = gates
        A = -mx.exp(arrays["A_log"].astype(mx.float32))
        log_alpha = A * softplus(a.astype(mx.float32) + arrays["dt_bias"].astype(mx.float32))
        grouped = None if state is None else state[:, ::G]
        state = gated_delta_final_state(l2_normalize(k), v, log_alpha, mx.sigmoid(b.astype(mx.float32)), grouped)
        return mx.repeat(state, G, axis=1) if G > 1 else state

    # ----- stage 2: attention over the KV cache -----
    def attention(self, q, k, v, attention, cache: LayerCache | None, offset: int):
        """Appends k, v to the cache and attends with the queries of attention-mode tokens.

        q [B,H,T,d] (None when no token of this call is in attention mode), k [B,Hkv,T,d],
        v [B,Hkv,T,dv]; attention: numpy bool [B,T]. Returns [B,T,H,dv] (rows of
        recurrent-mode tokens are don't-care) or None if no token of this call is in attention mode.
        """
        if cache is not None:
            if cache.kv_dropped:  # OryxModel checked that no token of this call reads by attention
                return None
            k, v = cache.append_kv(k, v)
        if q is None:
            return None
        T = attention.shape[1]
        scale = self.cfg.head_dim ** -0.5
        rows = np.arange(T) if attention.all() else np.flatnonzero(attention.any(axis=0))  # tokens read by attention
        if len(rows) == T:
            mask = "causal" if T > 1 else None
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask).transpose(0, 2, 1, 3)
        visible = (offset + rows)[:, None] >= np.arange(k.shape[2])[None, :]
        o = mx.fast.scaled_dot_product_attention(q[:, :, mx.array(rows)], k, v, scale=scale, mask=mx.array(visible))
        slot = np.zeros(T, dtype=np.int32)
        slot[rows] = np.arange(len(rows))  # each token's row in `o`; recurrent tokens read any row
        return o[:, :, mx.array(slot)].transpose(0, 2, 1, 3)

    # ----- stage 3: readout choice, gated norm, output projection -----
    def output_weights(self) -> tuple:
        layout, projections = fused_weights(self, self.derived, ("o_proj",))
        arrays = {"o_proj": projections}
        if self.cfg.output_norm:
            arrays["o_norm"] = self.o_norm.weight
        return layout, arrays

    def output(self, layout, arrays, o_attn, o_rec, g, attention):
        """Each token's readout (attention where `attention` [B,T] is True) -> gated norm -> o_proj."""
        if o_rec is None:
            o = o_attn
        elif o_attn is None:
            o = o_rec
        else:
            o = mx.where(attention[:, :, None, None], o_attn, o_rec)
        return apply_fused(layout, arrays["o_proj"], self._gated_norm(o, g, arrays.get("o_norm")), (("o_proj",),))[0]

    def _gated_norm(self, o, g, norm_weight):
        """o [B,T,H,dv], g (g_proj's output or None) -> [B,T,H*dv]: RMSNorm per head (or over
        all heads) and the SiLU(g) gate."""
        cfg = self.cfg
        B, T, H, dv = o.shape
        if cfg.o_norm_grouping == "all":
            o = o.reshape(B, T, 1, H * dv)
        gate = nn.silu(g).reshape(o.shape) if cfg.output_gate else None
        norm = (lambda t: mx.fast.rms_norm(t, norm_weight, cfg.norm_eps))
        if not cfg.output_norm:
            y = o if gate is None else o * gate
        elif cfg.gate_before_norm:
            y = norm(o if gate is None else o * gate)
        else:
            y = norm(o) if gate is None else norm(o) * gate
        return y.reshape(B, T, H * dv)



class MLP(nn.Module):
    """SwiGLU (gate_proj and up_proj as one fused matmul)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.derived = DerivedArrays()

    def weights(self) -> tuple:
        """(static layout, arrays) for `apply`."""
        (gate_up, gate_up_arrays), (down, down_arrays) = (fused_weights(self, self.derived, names) for names in (
            ("gate_proj", "up_proj"), ("down_proj",)))
        return (gate_up, down), (gate_up_arrays, down_arrays)

    def apply(self, layout, arrays, x):
        gate, up = apply_fused(layout[0], arrays[0], x, (("gate_proj",), ("up_proj",)))
        return apply_fused(layout[1], arrays[1], nn.silu(gate) * up, (("down_proj",),))[0]


class OryxBlock(nn.Module):
    """Pre-norm residual block: mixer, then SwiGLU MLP (if mlp_hidden). A call runs in three
    stages: `_local` (attention norm and the mixer's local stage), the attention over the KV
    cache, and `_output` (the mixer's output, residuals, the MLP). For single tokens with a
    cache the first and last run as mx.compile'd graphs (static shapes: decoding traces them
    once per mode pattern), since there op overhead, not arithmetic, dominates on a CPU."""

    def __init__(self, cfg: OryxConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = OryxMixer(cfg)
        if cfg.mlp_hidden:
            self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
            self.mlp = MLP(cfg.d_model, cfg.mlp_hidden)
        self.compiled_stages = DerivedArrays()

    def _stage(self, name: str, static: tuple, compiled: bool):
        """self.<name> with its static arguments bound; compiled once per static arguments
        (mx.compile traces again for new input shapes)."""
        def bound():
            return functools.partial(getattr(self, name), static)

        return self.compiled_stages.get((name, static), tuple, lambda: mx.compile(bound())) if compiled else bound()

    def _local(self, static, arrays, x, window, state, rope):
        normed = mx.fast.rms_norm(x, arrays["attn_norm"], self.mixer.cfg.norm_eps)
        return self.mixer.local(static, arrays["mixer"], normed, window, state, rope)

    def _output(self, static, arrays, x, o_attn, o_rec, g, attention):
        h = x + self.mixer.output(static[0], arrays["mixer"], o_attn, o_rec, g, attention)
        if "mlp" not in self:
            return h
        normed = mx.fast.rms_norm(h, arrays["mlp_norm"], self.mixer.cfg.norm_eps)
        return h + self.mlp.apply(static[1], arrays["mlp"], normed)

    def __call__(self, x, attention, rope, cache: LayerCache | None = None, last_only: bool = False):
        """x [B,T,D] -> [B,T,D]; attention: numpy bool [B,T], True where a token reads by attention; rope:
        `rope_table` of the tokens' positions. `last_only`: the caller reads the last token's output only; where
        every token attends, the output is that token's alone [B,1,D] (the cache still takes every token)."""
        T = x.shape[1]
        all_attention = bool(attention.all())
        # the last token alone: its query (projected for it only), one attention row that every key precedes (no
        # mask), the output and the MLP for that token
        last_row = last_only and all_attention and T > 1
        # with a cache the state advances whatever the mode, until the state is dropped
        recurrent = not all_attention or (cache is not None and not cache.recurrent_dropped)
        offset = cache.offset if cache is not None else 0
        single_step = T == 1 and cache is not None
        # a prompt of attention-mode tokens advances the state alone (a single step keeps the token-step path)
        static, mixer_arrays = self.mixer.local_weights(recurrent, (all_attention or bool(attention.any()))
                                                        and not last_row, readout=not all_attention or T == 1)
        q_attn, k, v, o_rec, g, window, state = self._stage("_local", static, single_step)(
            {"attn_norm": self.attn_norm.weight, "mixer": mixer_arrays}, x, None if cache is None else cache.conv,
            None if cache is None else cache.recurrent, rope)
        if last_row:
            normed = mx.fast.rms_norm(x[:, -1:], self.attn_norm.weight, self.mixer.cfg.norm_eps)
            q_attn, x, g = self.mixer.last_query(normed, rope), x[:, -1:], None if g is None else g[:, -1:]
            o_attn = self.mixer.attention(q_attn, k, v, attention[:, -1:], cache, offset + T - 1)
        else:
            o_attn = self.mixer.attention(q_attn, k, v, attention, cache, offset)
        if all_attention:
            o_rec = None  # the recurrent readout (if the state advanced) is read by no token of this call
        if cache is not None:
            cache.conv, cache.recurrent = window, state
            cache.offset += T
        mixer_layout, arrays = self.mixer.output_weights()
        arrays, mlp_layout = {"mixer": arrays}, None
        if "mlp" in self:
            mlp_layout, arrays["mlp"] = self.mlp.weights()
            arrays["mlp_norm"] = self.mlp_norm.weight
        readout = mx.array(attention) if o_attn is not None and o_rec is not None else None  # per-token choice
        return self._stage("_output", (mixer_layout, mlp_layout), single_step)(arrays, x, o_attn, o_rec, g, readout)


MLX_SHARINGS = ("kv", "kv-proj")


def check_mlx_sharing(cfg: OryxConfig, source: str = "config") -> None:
    """The MLX backend implements the modes sharing the key and value projections: the design's block ("kv") and
    the recurrence reading them through convolutions of its own ("kv-proj")."""
    if cfg.sharing not in MLX_SHARINGS:
        raise ValueError(f"{source}: sharing {cfg.sharing!r} runs on the torch backend only; "
                         f"the MLX backend runs sharing 'kv' and 'kv-proj'")


class OryxModel(nn.Module):
    def __init__(self, cfg: OryxConfig):
        super().__init__()
        check_mlx_sharing(cfg)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = [OryxBlock(cfg) for _ in range(cfg.n_layers)]
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def __call__(self, tokens, modes=True, cache: list[LayerCache] | None = None, last_only: bool = False,
                 picked: bool = False):
        """Logits [B, T, V] for tokens [B, T]; with `last_only` the last token's only, [B, 1, V] (what sampling after
        a prompt reads: the vocabulary projection of every prompt token is a fifth of a small model's prompt work).

        modes: bool (numpy, mx or Python) broadcastable to [n_layers, B, T], True = attention
        mode. cache: a prompt cache from `make_cache()`, updated in place (KV, conv windows,
        recurrent state, position), or None for a stateless forward over the whole sequence.
        picked: tokens is an mx.array of ids this model picked itself (an argmax over its vocabulary, so in range),
        possibly not yet computed; their values are not read on the host, so the call does not wait for them.
        """
        if picked:
            ids = tokens
            if ids.ndim != 2 or not mx.issubdtype(ids.dtype, mx.integer):
                raise ValueError(f"tokens: expected picked integer ids [batch, time], got {ids.dtype} {ids.shape}")
        else:
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
        if cache is not None:
            check_cache_fits(cache, attention)
        x = self.embed(mx.array(ids))
        rope = rope_table(self.cfg, 0 if cache is None else cache[0].offset, T)
        for i, layer in enumerate(self.layers):
            x = layer(x, attention[i], rope, None if cache is None else cache[i], last_only and i == L - 1)
        x = self.norm(x[:, -1:] if last_only else x)
        return self.embed.as_linear(x) if self.cfg.tie_embeddings else self.lm_head(x)

    def make_cache(self) -> list[LayerCache]:
        cfg = self.cfg  # the conv window's recurrent-only channels (OryxMixer.local_weights' order)
        kv_rec = (cfg.n_kv_heads * (cfg.head_dim + cfg.v_head_dim)) if cfg.recurrent_kv_convs else 0
        return make_prompt_cache(cfg.n_layers, cfg.n_heads * cfg.head_dim + kv_rec)


def check_cache_fits(cache: list[LayerCache], attention) -> None:
    """Refuses, before any layer changes its cache, a call the cache cannot serve.

    attention: bool [n_layers, B, T], True where a token reads by attention.
    """
    L, B, _ = attention.shape
    if len(cache) != L:
        raise ValueError(f"cache: has {len(cache)} layers, the model has {L}")
    held = cache[0].batch_size
    if held is not None and held != B:
        raise ValueError(f"cache: holds {held} sequences, tokens have batch {B}")
    offset = cache[0].offset
    for layer_cache, any_attention, all_attention in zip(cache, attention.any(axis=(1, 2)), attention.all(axis=(1, 2))):
        if layer_cache.kv_dropped and any_attention:
            raise ValueError(f"modes: attention-mode token at position >= {offset} after the KV cache was "
                             "dropped; use kv_policy='keep'")
        if layer_cache.recurrent_dropped and not all_attention:
            raise ValueError(f"modes: recurrent-mode token at position >= {offset} after the recurrent state was "
                             "dropped; use state_policy='keep'")
