"""The CPU decode step (oryx_torch.host_step) against the float64 reference and against the generic step form
it replaces on the CPU: both mixers, identity and learned convs, every config flag, attention / recurrent /
per-sequence plans, a dropped recurrent state or KV cache, sequences at different positions; the cache it
leaves behind (state, keys, values, conv windows) is the generic step's."""
import numpy as np
import pytest
import torch

from oryx_core.config import preset
from oryx_core.reference import OryxReference
from oryx_torch import host_step
from oryx_torch.model import OryxModel
from model_params import lively_params
from error_metrics import relative_error
from torch_models import VARIANTS

TOL = 1e-4  # against the float64 reference, as in test_model.py
SAME = 1e-5  # against the generic fp32 step: the same arithmetic up to rounding


def build(mixer, variant, seed=1):
    cfg = preset("tiny", mixer, **VARIANTS[variant])  # tiny has GQA: 4 query heads over 2 kv heads
    params = lively_params(cfg, seed)
    if variant == "retrofitted_llama":  # identity convs, as oryx_convert's Llama import writes them
        for name in params:
            if ".conv_" in name:
                params[name] = np.zeros_like(params[name])
                params[name][:, -1] = 1.0
    model = OryxModel(cfg, seed=None)
    model.load_params(params)
    return model.eval(), OryxReference(cfg, params)


def decode(model, tokens, modes, prompt, generic, drop=None, ragged=False):
    """Prefill tokens[:, :prompt], then step through the rest; logits [B, T - prompt, V] and the cache."""
    B, T = tokens.shape
    cache = model.make_cache(B, T + 1)
    out = []
    with torch.no_grad():
        model(torch.tensor(tokens[:, :prompt]), torch.tensor(modes[:, :prompt]), cache=cache)
        if drop == "state":
            cache.drop_recurrent()
        elif drop == "kv":
            cache.drop_kv()
        cache.ragged = ragged
        applies = host_step.applies
        host_step.applies = (lambda m: False) if generic else applies
        try:
            for t in range(prompt, T):
                out.append(model.step(torch.tensor(tokens[:, t]), torch.tensor(modes[:, t]), cache).numpy())
        finally:
            host_step.applies = applies
    return np.stack(out, 1), cache


def cache_tensors(cache):
    return [t.clone() for layer in cache.layers for t in layer.tensors()]


def plans(rng, B, T, P):
    per_sequence = np.repeat(rng.random((B, -(-T // 3))) < 0.5, 3, axis=1)[:, :T]
    return {"prefill-attention": np.broadcast_to(np.arange(T) < P, (B, T)), "per_sequence": per_sequence}


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_host_step_matches_reference_and_generic_step(mixer, variant):
    model, ref = build(mixer, variant)
    with torch.no_grad():
        assert host_step.applies(model)
    rng = np.random.default_rng(0)
    B, P, T = 2, 5, 12
    tokens = rng.integers(0, model.cfg.vocab_size, (B, T))
    for name, modes in plans(rng, B, T, P).items():
        want = ref.forward(tokens, modes)[0][:, P:]
        got, cache = decode(model, tokens, modes, P, generic=False)
        generic, generic_cache = decode(model, tokens, modes, P, generic=True)
        assert relative_error(got, want) < TOL, name
        assert relative_error(got, generic) < SAME, name
        for a, b in zip(cache_tensors(cache), cache_tensors(generic_cache)):
            assert relative_error(a, b) < SAME, name
    assert relative_error(got, decode(model, tokens, np.zeros((B, T), bool), P, generic=False)[0]) > 1e-2


@pytest.mark.parametrize("identity_attention_convs", [False, True])
@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_kv_proj_host_step_matches_reference_and_generic_step(mixer, identity_attention_convs):
    """Sharing "kv-proj": the recurrence reads k_proj/v_proj through conv_k_rec/conv_v_rec (learned) while attention
    reads them through conv_k/conv_v (the identity in a retrofitted Llama), under every plan, dropped parts included."""
    cfg = preset("tiny", mixer, sharing="kv-proj", conv_bias=not identity_attention_convs,
                 **(dict(output_gate=False, output_norm=False, conv_activation="none") if identity_attention_convs
                    else {}))
    params = lively_params(cfg, 3)
    if identity_attention_convs:
        for name in params:
            if ".conv_k." in name or ".conv_v." in name:
                params[name] = np.zeros_like(params[name])
                params[name][:, -1] = 1.0
    model = OryxModel(cfg, seed=None)
    model.load_params(params)
    model, ref = model.eval(), OryxReference(cfg, params)
    with torch.no_grad():
        assert host_step.applies(model)
    constants = host_step.layer_constants(model.layers[0].mixer)
    assert (constants.identity["k"], constants.identity["k_rec"]) == (identity_attention_convs, False)
    rng = np.random.default_rng(4)
    B, P, T = 2, 5, 12
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    cases = [(modes, None) for modes in plans(rng, B, T, P).values()]
    cases += [(np.broadcast_to(np.ones(T, bool), (B, T)), "state"), (np.broadcast_to(np.arange(T) < P, (B, T)), "kv")]
    for modes, drop in cases:
        want = ref.forward(tokens, modes)[0][:, P:]
        got, cache = decode(model, tokens, modes, P, generic=False, drop=drop)
        generic, generic_cache = decode(model, tokens, modes, P, generic=True, drop=drop)
        assert relative_error(got, want) < TOL, drop
        assert relative_error(got, generic) < SAME, drop
        for a, b in zip(cache_tensors(cache), cache_tensors(generic_cache)):
            assert relative_error(a, b) < SAME, drop


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_dropped_parts_and_ragged_positions(mixer):
    model, ref = build(mixer, "retrofitted_llama", seed=2)
    rng = np.random.default_rng(1)
    B, P, T = 3, 4, 10
    tokens = rng.integers(0, model.cfg.vocab_size, (B, T))
    cases = {("state", False): np.ones((B, T), bool), ("kv", False): np.arange(T) < P,
             (None, True): plans(rng, B, T, P)["per_sequence"], ("state", True): np.ones((B, T), bool)}
    for (drop, ragged), modes in cases.items():
        modes = np.broadcast_to(modes, (B, T))
        want = ref.forward(tokens, modes)[0][:, P:]
        got, _ = decode(model, tokens, modes, P, generic=False, drop=drop, ragged=ragged)
        generic, _ = decode(model, tokens, modes, P, generic=True, drop=drop, ragged=ragged)
        assert relative_error(got, want) < TOL, (drop, ragged)
        assert relative_error(got, generic) < SAME, (drop, ragged)


def test_identity_convs_are_recognised_and_recomputed_after_a_weight_change():
    model, _ = build("gdn", "retrofitted_llama")
    mixer = model.layers[0].mixer
    assert all(host_step.layer_constants(mixer).identity.values())
    with torch.no_grad():
        mixer.conv_q.weight[3, 0] = 0.5  # a learned tap: q_rec's conv is no longer the identity
    assert host_step.layer_constants(mixer).identity == {"k": True, "v": True, "q": False}
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, model.cfg.vocab_size, (1, 8))
    modes = np.zeros((1, 8), bool)
    got, _ = decode(model, tokens, modes, 3, generic=False)
    generic, _ = decode(model, tokens, modes, 3, generic=True)
    assert relative_error(got, generic) < SAME


def test_generic_path_where_the_host_step_does_not_apply():
    model, _ = build("gdn", "default")
    assert not host_step.applies(model)  # autograd on
    with torch.no_grad():
        assert host_step.applies(model)
        assert not host_step.applies(OryxModel(preset("tiny", "gdn", sharing="none")))
        assert not host_step.applies(OryxModel(preset("tiny", "gdn", sharing="qkv")))
        assert host_step.applies(OryxModel(preset("tiny", "gdn", sharing="kv-proj")))
        assert not host_step.applies(model.to(torch.bfloat16))


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_identity_convs_pass_through_in_the_parallel_form(mixer):
    """Prefill and eval with a Llama import's identity convs skip the conv arithmetic on the CPU without autograd:
    the same logits and conv windows as the reference, at prompts shorter and longer than the window; with
    autograd on the conv runs, so its weights still get gradients."""
    model, ref = build(mixer, "retrofitted_llama", seed=3)
    conv = model.layers[0].mixer.conv_k
    with torch.no_grad():
        assert conv.is_identity() and conv.passes_through(torch.zeros(1, 4, conv.weight.shape[0]))
    assert not conv.passes_through(torch.zeros(1, 4, conv.weight.shape[0]))  # autograd on
    rng = np.random.default_rng(4)
    B, T = 2, 9
    tokens = rng.integers(0, model.cfg.vocab_size, (B, T))
    modes = plans(rng, B, T, 4)["per_sequence"]
    want = ref.forward(tokens, modes)[0]
    with torch.no_grad():
        assert relative_error(model(torch.tensor(tokens), torch.tensor(modes)).numpy(), want) < TOL
        cache = model.make_cache(B, T)
        pieces = [model(torch.tensor(tokens[:, :2]), torch.tensor(modes[:, :2]), cache=cache).numpy(),  # T < W - 1
                  model(torch.tensor(tokens[:, 2:]), torch.tensor(modes[:, 2:]), cache=cache).numpy()]
    assert relative_error(np.concatenate(pieces, 1), want) < TOL
    window = cache.layers[0].conv["k"]
    with torch.no_grad():
        k_inputs = torch.nn.functional.linear(
            model.layers[0].attn_norm(model.embed(torch.tensor(tokens[:, -window.shape[1]:]))),
            model.layers[0].mixer.k_proj.weight)
    assert relative_error(window, k_inputs) < SAME  # the window holds the last W-1 inputs
    logits = model(torch.tensor(tokens), torch.tensor(modes))
    logits.square().mean().backward()
    assert float(model.layers[0].mixer.conv_k.weight.grad.abs().max()) > 0


def test_last_only_logits_are_the_last_row():
    """A prompt read before sampling projects only its last token onto the vocabulary; the backend's prefill
    (what generation calls) returns that row."""
    from oryx_torch.backend import TorchModel

    model, ref = build("gdn", "default", seed=5)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, model.cfg.vocab_size, (2, 7))
    modes = plans(rng, 2, 7, 3)["per_sequence"]
    with torch.no_grad():
        full = model(torch.tensor(tokens), torch.tensor(modes)).numpy()
        last = model(torch.tensor(tokens), torch.tensor(modes), last_only=True).numpy()
    assert last.shape == (2, 1, model.cfg.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)
    backend = TorchModel(model, cuda_graphs=False)
    cache = backend.make_cache(2, 8)
    got = backend.prefill(cache, tokens, modes).numpy()
    assert relative_error(got, ref.forward(tokens, modes)[0][:, -1]) < TOL


def test_grouped_chunked_recurrence_is_the_repeated_one():
    """GDN's chunked recurrence once per key/value head group equals the one over repeated heads (what the
    parallel form runs on the CPU without autograd) and the float64 per-token loop, at lengths that end inside a
    chunk and that span several chunks."""
    from oryx_torch.kernels.gdn.chunk_torch import chunk_gated_delta_rule_grouped, chunk_gated_delta_rule_torch
    from oryx_torch.kernels.gdn.naive import naive_recurrent_gated_delta_rule

    gen = torch.Generator().manual_seed(0)
    for B, T, Hkv, G, K, V in [(2, 70, 2, 3, 8, 16), (1, 5, 1, 2, 4, 8)]:
        q = torch.randn(B, T, Hkv * G, K, generator=gen)
        k = torch.nn.functional.normalize(torch.randn(B, T, Hkv, K, generator=gen), dim=-1)
        v = torch.randn(B, T, Hkv, V, generator=gen)
        g, beta = -torch.rand(B, T, Hkv, generator=gen) * 0.5, torch.rand(B, T, Hkv, generator=gen)
        state = torch.randn(B, Hkv, K, V, generator=gen)
        repeated = [t.repeat_interleave(G, dim=2) for t in (k, v, g, beta)]
        got, got_state = chunk_gated_delta_rule_grouped(q, k, v, g, beta, scale=0.3, initial_state=state,
                                                        output_final_state=True, chunk_size=16)
        want, want_state = chunk_gated_delta_rule_torch(q, *repeated, scale=0.3, output_final_state=True,
                                                        initial_state=state.repeat_interleave(G, 1), chunk_size=16)
        exact, exact_state = naive_recurrent_gated_delta_rule(
            *(t.double() for t in (q, *repeated)), scale=0.3, initial_state=state.repeat_interleave(G, 1).double(),
            output_final_state=True)
        assert relative_error(got, want) < SAME and relative_error(got_state.repeat_interleave(G, 1), want_state) < SAME
        assert relative_error(got, exact) < 1e-5 and relative_error(got_state.repeat_interleave(G, 1), exact_state) < 1e-5
