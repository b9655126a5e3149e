"""The CPU prompt paths against the float64 reference: GDN's grouped chunked recurrence (outputs and final state,
or the final state alone) on fresh random inputs, gates from mild to harsh; and prompts over several chunks read
in attention mode with the recurrent state kept (the prefill-attention plan, whose state is advanced without its
readout), in recurrent mode and in mixed modes, then decoded, against the reference and the generic path."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oryx_core.config import preset
from oryx_core.reference import OryxReference
from oryx_torch import model as model_module
from oryx_torch.kernels.gdn.chunk_torch import chunk_gated_delta_rule_grouped
from oryx_torch.kernels.gdn.naive import naive_recurrent_gated_delta_rule
from oryx_torch.model import OryxModel
from model_params import lively_params
from error_metrics import relative_error
from torch_models import VARIANTS

TOL = 1e-4   # a model's logits against the float64 reference, as in test_model.py
KERNEL_TOL = 2e-5  # the fp32 recurrence against the float64 loop
SAME = 1e-5  # against the generic fp32 path: the same function up to rounding


def gdn_inputs(gen, B, T, Hkv, G, K, V, gates):
    q = F.normalize(torch.randn(B, T, Hkv * G, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, Hkv, K, generator=gen), dim=-1)
    v = torch.randn(B, T, Hkv, V, generator=gen)
    g = -torch.rand(B, T, Hkv, generator=gen) * 0.5
    beta = torch.rand(B, T, Hkv, generator=gen)
    if gates == "harsh":  # some tokens wipe the state (decay e^-30), the rest keep it whole and write fully,
        # along nearly parallel keys (the delta rule's corrections then cancel most of each write)
        g = torch.where(torch.rand(B, T, Hkv, generator=gen) < 0.1, torch.full_like(g, -30.0), g * 1e-3)
        beta = 1 - beta * 1e-2
        k = F.normalize(k[:, :1] + 0.2 * k, dim=-1)
    return q, k, v, g, beta


@pytest.mark.parametrize("B, T, Hkv, G, K, V, chunk, gates", [
    (2, 150, 2, 3, 8, 16, 64, "mild"),     # three chunks, the last one partial
    (1, 128, 3, 1, 16, 8, 32, "mild"),     # whole chunks, one query head per key/value head
    (1, 5, 1, 2, 4, 8, 64, "mild"),        # shorter than a chunk
    (2, 100, 2, 2, 8, 8, 16, "harsh"),
])
@pytest.mark.parametrize("initial", [True, False])
def test_grouped_recurrence_outputs_and_state_alone(B, T, Hkv, G, K, V, chunk, gates, initial):
    gen = torch.Generator().manual_seed(T * 7 + G)
    q, k, v, g, beta = gdn_inputs(gen, B, T, Hkv, G, K, V, gates)
    state = torch.randn(B, Hkv, K, V, generator=gen) if initial else None
    repeated = [t.repeat_interleave(G, dim=2) for t in (k, v, g, beta)]
    want, want_state = naive_recurrent_gated_delta_rule(
        *(t.double() for t in (q, *repeated)), scale=0.3, output_final_state=True,
        initial_state=None if state is None else state.repeat_interleave(G, 1).double())
    got, got_state = chunk_gated_delta_rule_grouped(q, k, v, g, beta, scale=0.3, initial_state=state,
                                                    output_final_state=True, chunk_size=chunk)
    none, alone = chunk_gated_delta_rule_grouped(None, k, v, g, beta, initial_state=state, output_final_state=True,
                                                 chunk_size=chunk)
    assert none is None and got.dtype == torch.float32 and got_state.shape == (B, Hkv, K, V)
    assert relative_error(got, want) < KERNEL_TOL
    assert relative_error(got_state.repeat_interleave(G, 1), want_state) < KERNEL_TOL
    assert relative_error(alone.repeat_interleave(G, 1), want_state) < KERNEL_TOL
    # the state of a sequence that ran one token less is not the final one: the check above can fail
    shorter = chunk_gated_delta_rule_grouped(None, *(t[:, :-1] for t in (k, v, g, beta)), initial_state=state,
                                             output_final_state=True, chunk_size=chunk)[1]
    assert relative_error(shorter.repeat_interleave(G, 1), want_state) > 1e-3


def test_grouped_recurrence_refuses_mismatched_heads():
    q, k, v, g, beta = gdn_inputs(torch.Generator().manual_seed(0), 1, 4, 2, 2, 4, 4, "mild")
    with pytest.raises(ValueError, match="grouped heads"):
        chunk_gated_delta_rule_grouped(q[:, :, :3], k, v, g, beta)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_delta_rule_grouped(q, k, v, g, beta, chunk_size=0)


def build(variant, seed, **overrides):
    cfg = preset("tiny", "gdn", **VARIANTS[variant], **overrides)
    params = lively_params(cfg, seed)
    model = OryxModel(cfg, seed=None)
    model.load_params(params)
    return model.eval(), OryxReference(cfg, params)


def prefill_then_decode(model, tokens, modes, prompt):
    """Prefill tokens[:, :prompt] under modes, step through the rest; (logits of the steps, the cache)."""
    B, T = tokens.shape
    cache = model.make_cache(B, T + 1)
    out = []
    with torch.no_grad():
        model(torch.tensor(tokens[:, :prompt]), torch.tensor(modes[:, :prompt]), cache=cache)
        for t in range(prompt, T):
            out.append(model.step(torch.tensor(tokens[:, t]), torch.tensor(modes[:, t]), cache).numpy())
    return np.stack(out, 1), cache


@pytest.mark.parametrize("variant, overrides", [("default", {}), ("retrofitted_llama", {}),
                                                ("untied_no_rope_silu", dict(n_kv_heads=4))])
def test_long_prompts_against_the_reference(variant, overrides, monkeypatch):
    """Prompts of 70 tokens (two chunks, the last partial) in attention mode with the state kept, in recurrent mode
    and in mixed modes, then 3 decoded tokens: logits against the float64 reference, and the cache the attention-mode prompt
    leaves (state advanced without its readout) against the one the generic path leaves."""
    model, ref = build(variant, seed=3, **overrides)
    rng = np.random.default_rng(3)
    B, P, T = 2, 70, 73
    tokens = rng.integers(0, model.cfg.vocab_size, (B, T))
    calls = []  # one per forward call whose states the model advanced alone (grouped_final_state, all layers at
    # once), else per layer its output's q
    grouped, alone = model_module.chunk_gated_delta_rule_grouped, model_module.grouped_final_state
    monkeypatch.setattr(model_module, "chunk_gated_delta_rule_grouped",
                        lambda q, *args, **kwargs: calls.append(q is None) or grouped(q, *args, **kwargs))
    monkeypatch.setattr(model_module, "grouped_final_state",
                        lambda *args, **kwargs: calls.append(True) or alone(*args, **kwargs))
    plans = {"prefill-attention": np.broadcast_to(np.arange(T) < P, (B, T)),
             "recurrent": np.zeros((B, T), bool),
             "mixed": np.repeat(rng.random((B, -(-T // 8))) < 0.5, 8, axis=1)[:, :T]}
    for name, modes in plans.items():
        calls.clear()
        want = ref.forward(tokens, modes)[0][:, P:]
        got, cache = prefill_then_decode(model, tokens, modes, P)
        assert relative_error(got, want) < TOL, name
        if name == "prefill-attention":
            assert calls == [True]  # every layer advanced its state alone, all computed in one call
            monkeypatch.setattr(model_module, "grouped_recurrence_applies", lambda q: False)
            generic, generic_cache = prefill_then_decode(model, tokens, modes, P)
            monkeypatch.undo()
            assert relative_error(got, generic) < SAME
            for a, b in zip(cache.layers, generic_cache.layers):
                for x, y in zip(a.tensors(), b.tensors()):
                    assert relative_error(x, y) < SAME
    # the decoded logits depend on the prompt's plan: the comparisons above tell the plans apart
    assert relative_error(prefill_then_decode(model, tokens, plans["recurrent"], P)[0],
                          ref.forward(tokens, plans["prefill-attention"])[0][:, P:]) > 1e-3


def test_short_prompt_keeps_the_older_conv_window():
    """A prompt shorter than the conv window read in attention mode: the recurrent query's window keeps inputs
    from before it (cached by the earlier prompt), as the reference's does."""
    model, ref = build("default", seed=4)
    rng = np.random.default_rng(4)
    B, T = 1, 12
    tokens = rng.integers(0, model.cfg.vocab_size, (B, T))
    modes = np.broadcast_to(np.arange(T) < 8, (B, T))
    cache = model.make_cache(B, T + 1)
    out = []
    with torch.no_grad():
        model(torch.tensor(tokens[:, :6]), torch.tensor(modes[:, :6]), cache=cache)
        model(torch.tensor(tokens[:, 6:8]), torch.tensor(modes[:, 6:8]), cache=cache)  # 2 < W - 1 = 3 tokens
        for t in range(8, T):
            out.append(model.step(torch.tensor(tokens[:, t]), torch.tensor(modes[:, t]), cache).numpy())
    assert relative_error(np.stack(out, 1), ref.forward(tokens, modes)[0][:, 8:]) < TOL
