"""The float64 reference against itself (step vs parallel) and against independent models in this file."""
import numpy as np
import pytest

from oryx_core.config import preset
from oryx_core.init import init_params
from oryx_core.plan import ModePlan
from oryx_core.reference import OryxReference, Stepper
from error_metrics import relative_error as worst_relative_error


def random_params(cfg, seed):
    """init_params plus noise, so gates, norms and convs all matter."""
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed)
    return {k: v + rng.normal(0, 0.2 if v.ndim > 1 else 0.3, v.shape) for k, v in params.items()}


def rel(a, b):
    return worst_relative_error(a, b)


def run_steps(model, tokens, modes):
    stepper = Stepper(model, tokens.shape[0])
    return np.stack([stepper.step(tokens[:, t], modes[..., t]) for t in range(tokens.shape[1])], axis=1)


PLANS = ["attention", "recurrent", "A:0-7,R:7-19,A:19-", "every:3:4", "R:0-5,A:5-9,R:9-"]


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
@pytest.mark.parametrize("plan", PLANS)
def test_step_by_step_equals_parallel(mixer, plan):
    cfg = preset("tiny", mixer)
    model = OryxReference(cfg, random_params(cfg, 1))
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 29))
    modes = ModePlan.parse(plan).resolve(29)
    parallel, _ = model.forward(tokens, modes)
    assert rel(run_steps(model, tokens, modes), parallel) <= 1e-10


@pytest.mark.parametrize("flags", [
    dict(conv_bias=True, gate_before_norm=True, o_norm_grouping="all"),
    dict(output_gate=False, output_norm=False, rope=False, tie_embeddings=False, mlp_hidden=0),
])
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_step_equals_parallel_with_import_flags_and_per_sequence_plans(mixer, flags):
    cfg = preset("tiny", mixer, **flags)
    model = OryxReference(cfg, random_params(cfg, 3))
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, cfg.vocab_size, (3, 21))
    modes = rng.uniform(size=(cfg.n_layers, 3, 21)) < 0.5  # per layer and per sequence
    parallel, _ = model.forward(tokens, modes)
    assert rel(run_steps(model, tokens, modes), parallel) <= 1e-10


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_final_state_continues_the_sequence(mixer):
    """Forward over a prefix, hand its final states to the rest: equals one forward in recurrent mode."""
    cfg = preset("tiny", mixer, rope=False)
    model = OryxReference(cfg, random_params(cfg, 5))
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (1, 24))
    full, finals_full = model.forward(tokens, False)
    stepper = Stepper(model, 1)
    for t in range(24):
        stepper.step(tokens[:, t], False)
    for a, b in zip(finals_full, stepper.state):
        assert rel(a, b) <= 1e-10


def test_kv_drop_keeps_recurrent_logits_and_refuses_attention():
    cfg = preset("tiny")
    model = OryxReference(cfg, random_params(cfg, 7))
    tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, (1, 12))
    modes = ModePlan.parse("A:0-6,R:6-").resolve(12)
    parallel, _ = model.forward(tokens, modes)
    stepper = Stepper(model, 1)
    out = []
    for t in range(12):
        if t == 6:
            stepper.drop_kv()
        out.append(stepper.step(tokens[:, t], modes[t]))
    assert rel(np.stack(out, 1), parallel) <= 1e-10
    assert stepper.keys[0].shape[1] == 0
    with pytest.raises(ValueError, match="KV cache was dropped"):
        stepper.step(tokens[:, 0], True)


# ----- an independent model, written from DESIGN.md without the reference's code -----
def independent_forward(cfg, p, tokens, mode):
    """One sequence [T]; mode 'A' = a plain causal Transformer, 'R' = per-token recurrent loops."""
    T = len(tokens)
    H, Hkv, d, dv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim, cfg.d_model
    group = H // Hkv

    def norm(x, w):
        return w * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps)

    def sig(x):
        return 1 / (1 + np.exp(-x))

    def conv(x, w):  # causal, per channel, loop form
        out = np.zeros_like(x)
        W = w.shape[1]
        for t in range(T):
            for j in range(W):
                src = t - (W - 1 - j)
                if src >= 0:
                    out[t] += w[:, j] * x[src]
        return out * sig(out) if cfg.conv_act == "silu" else out

    def rope(x):  # x [T, n, d]: pairs (i, i + d/2) rotated by pos * theta^(-2i/d)
        y = x.copy()
        for t in range(T):
            for i in range(d // 2):
                ang = t / cfg.rope_theta ** (2 * i / d)
                c, s = np.cos(ang), np.sin(ang)
                y[t, :, i] = x[t, :, i] * c - x[t, :, i + d // 2] * s
                y[t, :, i + d // 2] = x[t, :, i + d // 2] * c + x[t, :, i] * s
        return y

    x = p["embed.weight"][tokens]
    for i in range(cfg.n_layers):
        w = lambda n: p[f"layers.{i}.{n}"]  # noqa: E731
        h = norm(x, w("attn_norm.weight"))
        k = conv(h @ w("mixer.k_proj.weight").T, w("mixer.conv_k.weight")).reshape(T, Hkv, d)
        v = conv(h @ w("mixer.v_proj.weight").T, w("mixer.conv_v.weight")).reshape(T, Hkv, dv)
        o = np.zeros((T, H, dv))
        if mode == "A":
            q = rope((h @ w("mixer.q_attn.weight").T).reshape(T, H, d))
            kr = rope(k)
            for head in range(H):
                kv = head // group
                for t in range(T):
                    s = np.array([q[t, head] @ kr[u, kv] for u in range(t + 1)]) / np.sqrt(d)
                    a = np.exp(s - s.max())
                    o[t, head] = (a / a.sum()) @ v[: t + 1, kv]
        else:
            q = conv(h @ w("mixer.q_rec.weight").T, w("mixer.conv_q.weight")).reshape(T, H, d)
            A = np.exp(w("mixer.A_log"))
            S = np.zeros((Hkv, d, dv))
            for t in range(T):
                if cfg.mixer == "gdn":
                    a = h[t] @ w("mixer.a_proj.weight").T + w("mixer.dt_bias")
                    decay = np.exp(-A * np.log1p(np.exp(a)))
                    beta = sig(h[t] @ w("mixer.b_proj.weight").T)
                else:
                    dt = np.log1p(np.exp(h[t] @ w("mixer.dt_proj.weight").T + w("mixer.dt_bias")))
                for kv in range(Hkv):
                    if cfg.mixer == "gdn":  # the delta rule, token by token
                        kk = k[t, kv] / np.sqrt(k[t, kv] @ k[t, kv] + 1e-6)
                        S[kv] = decay[kv] * S[kv]
                        S[kv] += beta[kv] * np.outer(kk, v[t, kv] - kk @ S[kv])
                    else:
                        S[kv] = np.exp(-A[kv] * dt[kv]) * S[kv] + dt[kv] * np.outer(k[t, kv], v[t, kv])
                for head in range(H):
                    kv = head // group
                    if cfg.mixer == "gdn":
                        qq = q[t, head] / np.sqrt(q[t, head] @ q[t, head] + 1e-6)
                        o[t, head] = S[kv].T @ qq / np.sqrt(d)
                    else:
                        o[t, head] = S[kv].T @ q[t, head] + w("mixer.D_skip")[kv] * v[t, kv]
        g = (h @ w("mixer.g_proj.weight").T).reshape(T, H, dv)
        y = norm(o, w("mixer.o_norm.weight")) * g * sig(g)
        x = x + y.reshape(T, H * dv) @ w("mixer.o_proj.weight").T
        h = norm(x, w("mlp_norm.weight"))
        gate = h @ w("mlp.gate_proj.weight").T
        x = x + (gate * sig(gate) * (h @ w("mlp.up_proj.weight").T)) @ w("mlp.down_proj.weight").T
    return norm(x, p["norm.weight"]) @ p["embed.weight"].T


@pytest.mark.parametrize("mixer, mode", [("gdn", "A"), ("gdn", "R"), ("mamba2", "A"), ("mamba2", "R")])
def test_pure_modes_equal_independent_models(mixer, mode):
    """All-attention == a plain causal Transformer; all-recurrent == naive per-token recurrences."""
    cfg = preset("tiny", mixer)
    params = {k: v.astype(np.float64) for k, v in random_params(cfg, 9).items()}
    tokens = np.random.default_rng(10).integers(0, cfg.vocab_size, 17)
    ours, _ = OryxReference(cfg, params).forward(tokens[None], mode == "A")
    assert rel(ours[0], independent_forward(cfg, params, tokens, mode)) <= 1e-10


def test_modes_actually_differ():
    """Guards the comparisons above: the two readouts must not coincide."""
    cfg = preset("tiny")
    model = OryxReference(cfg, random_params(cfg, 11))
    tokens = np.random.default_rng(12).integers(0, cfg.vocab_size, (1, 10))
    a, _ = model.forward(tokens, True)
    r, _ = model.forward(tokens, False)
    assert rel(a, r) > 1e-2
