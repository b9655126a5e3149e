"""Float64 NumPy reference of the whole Oryx model: the ground truth every backend is tested against.

Two independent forms of the same function:
- `forward`: the parallel form. Attention as a masked softmax matrix; the recurrences in
  their whole-sequence matrix form (Mamba-2's masked-decay quadratic form; Gated DeltaNet
  through the UT transform, one triangular solve over the sequence).
- `Stepper`: one token at a time, with a KV cache and a recurrent state per layer, both
  updated at every token whatever its mode, so the mode may switch at any token.

Shapes: tokens [B, T]; modes broadcastable to [L, B, T] (True = attention mode).
"""
from __future__ import annotations

import numpy as np

from .config import OryxConfig

L2NORM_EPS = 1e-6  # inside the square root, as in fla's l2norm


# ----- elementwise pieces -----
def silu(x):
    return x / (1.0 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0.0, x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def l2_normalize(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def rope_angles(cfg: OryxConfig, positions):
    inv_freq = cfg.rope_theta ** (-np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    angles = np.asarray(positions, dtype=np.float64)[..., None] * inv_freq
    return np.cos(angles), np.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on the last axis; x [..., T, H, d], cos/sin [T, d/2]."""
    if cos is None:
        return x
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def causal_conv(x, weight, bias, activation):
    """Depthwise causal conv over time; x [B, T, C], weight [C, W] (last tap = current token)."""
    W = weight.shape[1]
    padded = np.concatenate([np.zeros(x.shape[:1] + (W - 1,) + x.shape[2:]), x], axis=1)
    out = sum(padded[:, j:j + x.shape[1]] * weight[:, j] for j in range(W))
    if bias is not None:
        out = out + bias
    return silu(out) if activation == "silu" else out


def gated_out_norm(cfg: OryxConfig, o, g, weight):
    """o, g [B, T, H, dv] -> [B, T, H*dv]: RMSNorm (per head or over all heads) and SiLU(g) gate.

    The default is RMSNorm(o) * w * SiLU(g); `gate_before_norm` gives RMSNorm(o * SiLU(g)) * w
    (mamba-ssm's order); `output_norm` / `output_gate` off drop either part (Llama imports).
    """
    B, T, H, dv = o.shape
    if cfg.o_norm_grouping == "all":
        o = o.reshape(B, T, 1, H * dv)
        g = None if g is None else g.reshape(B, T, 1, H * dv)
    gate = silu(g) if cfg.output_gate else 1.0
    if not cfg.output_norm:
        y = o * gate
    elif cfg.gate_before_norm:
        y = rms_norm(o * gate, weight, cfg.norm_eps)
    else:
        y = rms_norm(o, weight, cfg.norm_eps) * gate
    return y.reshape(B, T, H * dv)


# ----- the recurrences in whole-sequence matrix form -----
def _decay_matrix(log_decay):
    """M[t, s] = exp(sum_{s < r <= t} log_decay[r]) for s <= t, else 0. log_decay [..., T]."""
    G = np.cumsum(log_decay, axis=-1)
    diff = G[..., :, None] - G[..., None, :]
    T = log_decay.shape[-1]
    causal = np.tril(np.ones((T, T), dtype=bool))
    return np.where(causal, np.exp(np.where(causal, diff, 0.0)), 0.0), G


def gdn_parallel(q, k, v, log_alpha, beta, scale, state):
    """Gated delta rule over a whole sequence by the UT transform.

    q [B,T,H,d] (H query heads), k [B,T,Hkv,d], v [B,T,Hkv,dv], log_alpha/beta [B,T,Hkv],
    state [B,Hkv,d,dv]. S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = scale S_t^T q_t.
    Writing S_t = gamma_t S_0 + sum_{s<=t} (gamma_t/gamma_s) k_s u_s^T gives
    (I + A) U = diag(beta) (V - Gamma K S_0) with A[t,s] = beta_t (gamma_t/gamma_s) k_t.k_s, s < t.
    """
    B, T, Hkv, d = k.shape
    G_heads = q.shape[2] // Hkv
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,Hkv,T,*]
    qh = q.reshape(B, T, Hkv, G_heads, d).transpose(0, 2, 3, 1, 4)  # [B,Hkv,G,T,d]
    la, bt = log_alpha.transpose(0, 2, 1), beta.transpose(0, 2, 1)  # [B,Hkv,T]
    M, G = _decay_matrix(la)
    gamma = np.exp(G)
    strict = M * np.tril(np.ones((T, T)), -1)
    A = bt[..., :, None] * strict * (kh @ kh.swapaxes(-1, -2))
    rhs = bt[..., None] * (vh - gamma[..., None] * (kh @ state))
    U = np.linalg.solve(np.eye(T) + A, rhs)
    scores = (qh @ kh[:, :, None].swapaxes(-1, -2)) * M[:, :, None]  # [B,Hkv,G,T,T]
    o = scale * (gamma[:, :, None, :, None] * (qh @ state[:, :, None]) + scores @ U[:, :, None])
    to_end = np.exp(G[..., -1:] - G)  # gamma_T / gamma_s
    final = gamma[..., -1, None, None] * state + (kh * to_end[..., None]).swapaxes(-1, -2) @ U
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, Hkv * G_heads, -1), final


def ssd_parallel(q, k, v, dt, A, D, state):
    """Mamba-2 (SSD) over a whole sequence in its masked-decay quadratic form.

    S_t = exp(A dt_t) S_{t-1} + dt_t k_t v_t^T, o_t = S_t^T q_t + D v_t (per kv head, q grouped).
    """
    B, T, Hkv, d = k.shape
    G_heads = q.shape[2] // Hkv
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    qh = q.reshape(B, T, Hkv, G_heads, d).transpose(0, 2, 3, 1, 4)
    dth = dt.transpose(0, 2, 1)  # [B,Hkv,T]
    M, G = _decay_matrix(A[None, :, None] * dth)
    gamma = np.exp(G)
    xs = dth[..., None] * vh  # dt_s v_s
    scores = (qh @ kh[:, :, None].swapaxes(-1, -2)) * M[:, :, None]
    o = gamma[:, :, None, :, None] * (qh @ state[:, :, None]) + scores @ xs[:, :, None]
    o = o + D[None, :, None, None, None] * vh[:, :, None]
    to_end = np.exp(G[..., -1:] - G)
    final = gamma[..., -1, None, None] * state + (kh * to_end[..., None]).swapaxes(-1, -2) @ xs
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, Hkv * G_heads, -1), final


def attention_parallel(q, k, v, scale):
    """Causal grouped-query softmax attention; q [B,T,H,d], k [B,T,Hkv,d], v [B,T,Hkv,dv]."""
    B, T, H, _ = q.shape
    G_heads = H // k.shape[2]
    kr, vr = np.repeat(k, G_heads, axis=2), np.repeat(v, G_heads, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, kr) * scale
    s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, vr)


class OryxReference:
    """The model in float64. `params` maps the spec's names to arrays (any float dtype)."""

    def __init__(self, cfg: OryxConfig, params: dict[str, np.ndarray]):
        self.cfg = cfg
        self.p = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}

    # ----- shared pieces of a layer -----
    def _w(self, i, name):
        return self.p.get(f"layers.{i}.mixer.{name}")

    def _projections(self, i, xn):
        """Everything a layer projects from its normed input, before the recurrence or attention."""
        cfg, B, T = self.cfg, xn.shape[0], xn.shape[1]
        H, Hkv, d, dv = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim
        w = lambda n: self._w(i, n)  # noqa: E731
        q_rec_name = "q_attn.weight" if cfg.sharing == "qkv" else "q_rec.weight"
        separate = cfg.sharing == "none"
        k, v = xn @ w("k_proj.weight").T, xn @ w("v_proj.weight").T
        return {
            "k": k, "v": v, "q_rec": (xn @ w(q_rec_name).T),
            # the recurrence's keys and values before its own convolutions ("kv-proj": the shared projections)
            "k_rec": (xn @ w("k_rec.weight").T) if separate else k,
            "v_rec": (xn @ w("v_rec.weight").T) if separate else v,
            "q_attn": (xn @ w("q_attn.weight").T).reshape(B, T, H, d),
            "g": (xn @ w("g_proj.weight").T).reshape(B, T, H, dv) if cfg.output_gate else None,
            "gate_in": [xn @ w(n).T for n in (("a_proj.weight", "b_proj.weight") if cfg.mixer == "gdn" else ("dt_proj.weight",))],
        }

    def _recurrent_inputs(self, i, k, v, q_rec, gate_in):
        """Turns post-conv k, v, q_rec [B,T,*] and the gate projections into recurrence inputs."""
        cfg = self.cfg
        B, T = k.shape[:2]
        H, Hkv, d, dv = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim
        k, v, q = k.reshape(B, T, Hkv, d), v.reshape(B, T, Hkv, dv), q_rec.reshape(B, T, H, d)
        A = -np.exp(self._w(i, "A_log"))
        if cfg.mixer == "gdn":
            a, b = gate_in
            log_alpha = A * softplus(a + self._w(i, "dt_bias"))
            return dict(q=l2_normalize(q), k=l2_normalize(k), v=v, log_alpha=log_alpha, beta=sigmoid(b))
        dt = softplus(gate_in[0] + self._w(i, "dt_bias"))
        return dict(q=q, k=k, v=v, dt=dt, A=A, D=self._w(i, "D_skip"))

    def _mlp(self, i, h):
        cfg = self.cfg
        if not cfg.mlp_hidden:
            return h
        p = f"layers.{i}."
        hn = rms_norm(h, self.p[p + "mlp_norm.weight"], cfg.norm_eps)
        act = silu(hn @ self.p[p + "mlp.gate_proj.weight"].T) * (hn @ self.p[p + "mlp.up_proj.weight"].T)
        return h + act @ self.p[p + "mlp.down_proj.weight"].T

    def _logits(self, x):
        x = rms_norm(x, self.p["norm.weight"], self.cfg.norm_eps)
        head = self.p["embed.weight"] if self.cfg.tie_embeddings else self.p["lm_head.weight"]
        return x @ head.T

    def _mix_and_project(self, i, x, o_attn, o_rec, g, attention_mask):
        """Chooses each token's readout by its mode, then gated norm and output projection."""
        o = np.where(attention_mask[:, :, None, None], o_attn, o_rec)
        y = gated_out_norm(self.cfg, o, g, self._w(i, "o_norm.weight")) @ self._w(i, "o_proj.weight").T
        return self._mlp(i, x + y)

    # ----- parallel form -----
    def forward(self, tokens, modes, states=None):
        """Logits [B, T, V] for tokens [B, T] under modes broadcastable to [L, B, T].

        Also returns the final recurrent state per layer. `states` optionally gives each
        layer's initial recurrent state (prefix-free otherwise).
        """
        cfg = self.cfg
        tokens = np.atleast_2d(tokens)
        B, T = tokens.shape
        modes = np.broadcast_to(np.asarray(modes, dtype=bool), (cfg.n_layers, B, T))
        x = self.p["embed.weight"][tokens]
        cos, sin = rope_angles(cfg, np.arange(T)) if cfg.rope else (None, None)
        finals = []
        for i in range(cfg.n_layers):
            xn = rms_norm(x, self.p[f"layers.{i}.attn_norm.weight"], cfg.norm_eps)
            pr = self._projections(i, xn)
            act, bias = cfg.conv_act, (lambda n: self._w(i, f"conv_{n}.bias"))
            k = causal_conv(pr["k"], self._w(i, "conv_k.weight"), bias("k"), act)
            v = causal_conv(pr["v"], self._w(i, "conv_v.weight"), bias("v"), act)
            q_rec = causal_conv(pr["q_rec"], self._w(i, "conv_q.weight"), bias("q"), act)
            Hkv, d, dv = cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim
            o_attn = attention_parallel(apply_rope(pr["q_attn"], cos, sin), apply_rope(k.reshape(B, T, Hkv, d), cos, sin),
                                        v.reshape(B, T, Hkv, dv), d ** -0.5)
            if cfg.recurrent_kv_convs:  # the recurrence reads its own keys and values
                k = causal_conv(pr["k_rec"], self._w(i, "conv_k_rec.weight"), bias("k_rec"), act)
                v = causal_conv(pr["v_rec"], self._w(i, "conv_v_rec.weight"), bias("v_rec"), act)
            r = self._recurrent_inputs(i, k, v, q_rec, pr["gate_in"])
            state = np.zeros((B, Hkv, d, dv)) if states is None else states[i]
            if cfg.mixer == "gdn":
                o_rec, final = gdn_parallel(r["q"], r["k"], r["v"], r["log_alpha"], r["beta"], cfg.gdn_scale, state)
            else:
                o_rec, final = ssd_parallel(r["q"], r["k"], r["v"], r["dt"], r["A"], r["D"], state)
            finals.append(final)
            x = self._mix_and_project(i, x, o_attn, o_rec, pr["g"], modes[i])
        return self._logits(x), finals


class Stepper:
    """Step-by-step decoding: per layer a KV cache, a conv window and a recurrent state.

    Every token appends its key/value to the cache and updates the recurrent state,
    whatever its mode; only the readout follows the mode. So the mode can switch at any
    token with nothing to convert.
    """

    def __init__(self, model: OryxReference, batch: int = 1):
        cfg = self.cfg = model.cfg
        self.model = model
        self.position = 0
        H, Hkv, d, dv, W = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim, cfg.conv_width
        separate = {"k_rec": Hkv * d, "v_rec": Hkv * dv} if cfg.recurrent_kv_convs else {}
        self.conv = [{"k": np.zeros((batch, W - 1, Hkv * d)), "v": np.zeros((batch, W - 1, Hkv * dv)),
                      "q": np.zeros((batch, W - 1, H * d)),
                      **{name: np.zeros((batch, W - 1, width)) for name, width in separate.items()}}
                     for _ in range(cfg.n_layers)]
        self.keys = [np.zeros((batch, 0, Hkv, d)) for _ in range(cfg.n_layers)]
        self.values = [np.zeros((batch, 0, Hkv, dv)) for _ in range(cfg.n_layers)]
        self.state = [np.zeros((batch, Hkv, d, dv)) for _ in range(cfg.n_layers)]
        self.keep_kv = True

    def _conv_step(self, i, name, x_new, weight_name):
        """Pushes one token through a causal conv, keeping the last W-1 inputs."""
        m = self.model
        window = np.concatenate([self.conv[i][name], x_new[:, None]], axis=1)  # [B, W, C]
        self.conv[i][name] = window[:, 1:]
        return causal_conv(window, m._w(i, f"conv_{weight_name}.weight"), m._w(i, f"conv_{weight_name}.bias"),
                           self.cfg.conv_act)[:, -1:]

    def _attend(self, i, q_attn, k, v, cos, sin, needed):
        """Appends this token's key/value and reads the cache with its attention query."""
        cfg = self.cfg
        B, Hkv, d, dv = q_attn.shape[0], cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim
        if not self.keep_kv:
            if needed:
                raise ValueError("attention-mode token after the KV cache was dropped; use the `keep` KV policy")
            return np.zeros((B, 1, cfg.n_heads, dv))
        self.keys[i] = np.concatenate([self.keys[i], apply_rope(k.reshape(B, 1, Hkv, d), cos, sin)], axis=1)
        self.values[i] = np.concatenate([self.values[i], v.reshape(B, 1, Hkv, dv)], axis=1)
        q = apply_rope(q_attn, cos, sin)[:, 0]  # [B, H, d]
        kr = np.repeat(self.keys[i], cfg.group_size, axis=2)
        vr = np.repeat(self.values[i], cfg.group_size, axis=2)
        s = np.einsum("bhd,bshd->bhs", q, kr) * d ** -0.5
        p = np.exp(s - s.max(-1, keepdims=True))
        return np.einsum("bhs,bshd->bhd", p / p.sum(-1, keepdims=True), vr)[:, None]

    def step(self, token, is_attention):
        """Logits [B, V] for one token per sequence; is_attention: bool, [B] or [L, B]."""
        cfg, m = self.cfg, self.model
        token = np.atleast_1d(token)
        B = token.shape[0]
        modes = np.broadcast_to(np.asarray(is_attention, dtype=bool), (cfg.n_layers, B))
        H, Hkv, d, dv = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim
        x = m.p["embed.weight"][token][:, None]  # [B, 1, D]
        cos, sin = rope_angles(cfg, np.array([self.position])) if cfg.rope else (None, None)
        for i in range(cfg.n_layers):
            xn = rms_norm(x, m.p[f"layers.{i}.attn_norm.weight"], cfg.norm_eps)
            pr = m._projections(i, xn)
            k = self._conv_step(i, "k", pr["k"][:, 0], "k")
            v = self._conv_step(i, "v", pr["v"][:, 0], "v")
            q_rec = self._conv_step(i, "q", pr["q_rec"][:, 0], "q")
            o_attn = self._attend(i, pr["q_attn"], k, v, cos, sin, modes[i].any())
            if cfg.recurrent_kv_convs:
                k = self._conv_step(i, "k_rec", pr["k_rec"][:, 0], "k_rec")
                v = self._conv_step(i, "v_rec", pr["v_rec"][:, 0], "v_rec")
            # recurrent state update and readout, one token
            r = m._recurrent_inputs(i, k, v, q_rec, pr["gate_in"])
            S = self.state[i]
            kt, vt = r["k"][:, 0], r["v"][:, 0]  # [B,Hkv,d], [B,Hkv,dv]
            if cfg.mixer == "gdn":
                alpha, beta = np.exp(r["log_alpha"][:, 0]), r["beta"][:, 0]
                S = alpha[..., None, None] * S
                new_v = beta[..., None] * (vt - np.einsum("bhkv,bhk->bhv", S, kt))
                S = S + kt[..., :, None] * new_v[..., None, :]
                skip = 0.0
                scale = cfg.gdn_scale
            else:
                dt = r["dt"][:, 0]
                S = np.exp(r["A"] * dt)[..., None, None] * S + (dt[..., None] * kt)[..., :, None] * vt[..., None, :]
                skip = np.repeat(r["D"][None, :, None] * vt, cfg.group_size, axis=1)
                scale = 1.0
            self.state[i] = S
            qg = r["q"][:, 0].reshape(B, Hkv, cfg.group_size, d)
            o_rec = (scale * np.einsum("bhkv,bhgk->bhgv", S, qg).reshape(B, H, dv) + skip)[:, None]
            x = m._mix_and_project(i, x, o_attn, o_rec, pr["g"], modes[i][:, None])
        self.position += 1
        return m._logits(x)[:, 0]

    def drop_kv(self):
        """The KV `drop` policy: frees the cache once the plan has no attention token left."""
        self.keys = [k[:, :0] for k in self.keys]
        self.values = [v[:, :0] for v in self.values]
        self.keep_kv = False
