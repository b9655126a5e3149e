"""MLX: a prompt in attention mode with the recurrent state kept advances the GDN state alone (no readout, q_rec
projected only for its conv window), against the float64 reference: the state function on fresh random inputs,
and whole models prefilled that way then decoded in recurrent mode, prompts over several chunks and shorter than
the conv window, float and quantised."""
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from oryx_mlx import model as model_module  # noqa: E402
from oryx_mlx.kernels.fallback import gated_delta_final_state  # noqa: E402
from error_metrics import relative_error  # noqa: E402
from mlx_models import perturbed_gdn  # noqa: E402

TOL = 1e-4


def reference_state(k, v, g, beta, state):
    """float64 per-token loop: S_t = e^{g_t} (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, per batch and head."""
    S = state.astype(np.float64).copy()
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]                                                   # [B, H, K], [B, H, V]
        S *= np.exp(g[:, t])[..., None, None]
        delta = beta[:, t][..., None] * (vt - np.einsum("bhk,bhkv->bhv", kt, S))
        S += kt[..., :, None] * delta[..., None, :]
    return S


@pytest.mark.parametrize("B, T, H, K, V, chunk, harsh", [(2, 150, 2, 8, 16, 64, False), (1, 5, 1, 4, 8, 64, False),
                                                          (1, 128, 3, 16, 8, 32, False), (2, 100, 2, 8, 8, 16, True)])
def test_final_state_against_the_float64_loop(B, T, H, K, V, chunk, harsh):
    rng = np.random.default_rng(T + H)
    k = rng.standard_normal((B, T, H, K))
    v = rng.standard_normal((B, T, H, V))
    g, beta = -rng.random((B, T, H)) * 0.5, rng.random((B, T, H))
    if harsh:  # some tokens wipe the state, the rest keep it and write fully along nearly parallel keys
        g = np.where(rng.random((B, T, H)) < 0.1, -30.0, g * 1e-3)
        beta = 1 - beta * 1e-2
        k = k[:, :1] + 0.2 * k
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    state = rng.standard_normal((B, H, K, V))
    want = reference_state(k, v, g, beta, state)
    got = gated_delta_final_state(*(mx.array(x.astype(np.float32)) for x in (k, v, g, beta, state)), chunk=chunk)
    assert relative_error(got, want) < 2e-5
    assert relative_error(got, reference_state(k[:, :-1], v[:, :-1], g[:, :-1], beta[:, :-1], state)) > 1e-3
    none = gated_delta_final_state(*(mx.array(x.astype(np.float32)) for x in (k, v, g, beta)), chunk=chunk)
    assert relative_error(none, reference_state(k, v, g, beta, np.zeros_like(state))) < 2e-5


def prefill_then_decode(model, tokens, modes, cuts):
    """The calls tokens[:, a:b] for consecutive cuts (the last cut to the end one token at a time); the logits of the
    single-token calls."""
    cache = model.make_cache()
    for a, b in zip(cuts, cuts[1:]):
        model(mx.array(tokens[:, a:b]), modes[a:b], cache)
    return np.concatenate([np.array(model(mx.array(tokens[:, t:t + 1]), modes[t:t + 1], cache))
                           for t in range(cuts[-1], tokens.shape[1])], axis=1)


@pytest.mark.parametrize("variant", [{}, dict(output_gate=False, output_norm=False, conv_activation="none"),
                                     dict(n_kv_heads=4, conv_bias=True, conv_activation="silu")])
def test_attention_prompt_then_recurrent_decode(variant, monkeypatch):
    """A 70-token prompt in attention mode (two chunks), then one of 2 tokens (shorter than the conv window), then
    recurrent steps: logits against the reference; every layer advanced its state alone in both prompt calls."""
    model, ref = perturbed_gdn(variant, seed=3)
    T = 76
    tokens = np.random.default_rng(4).integers(0, model.cfg.vocab_size, (2, T))
    modes = np.arange(T) < 72
    calls = []
    state_alone = model_module.gated_delta_final_state
    monkeypatch.setattr(model_module, "gated_delta_final_state",
                        lambda *args, **kwargs: calls.append(1) or state_alone(*args, **kwargs))
    got = prefill_then_decode(model, tokens, modes, [0, 70, 72])
    assert len(calls) == 2 * model.cfg.n_layers
    want = ref.forward(tokens, modes)[0][:, 72:]
    assert relative_error(got, want) < TOL
    # the decoded logits depend on the prompt's plan, so the check above can fail
    assert relative_error(got, ref.forward(tokens, np.zeros(T, bool))[0][:, 72:]) > 1e-3


def test_quantised_model_prompt_matches_its_readout_path(monkeypatch):
    """A quantised model: the state advanced alone (q_rec's window from the quantised rows) gives the logits of
    the path that computes the readout too."""
    from oryx_mlx.quantize import quantize_model

    model, _ = perturbed_gdn({}, seed=3)
    quantize_model(model, bits=4, group_size=32)
    T = 70
    tokens = np.random.default_rng(5).integers(0, model.cfg.vocab_size, (1, T))
    modes = np.arange(T) < 66
    alone = prefill_then_decode(model, tokens, modes, [0, 66])
    original = model_module.OryxMixer.local_weights
    monkeypatch.setattr(model_module.OryxMixer, "local_weights",
                        lambda self, recurrent, needs_q_attn, readout=True: original(self, recurrent, needs_q_attn))
    with_readout = prefill_then_decode(model, tokens, modes, [0, 66])
    assert relative_error(alone, with_readout) < 1e-5
