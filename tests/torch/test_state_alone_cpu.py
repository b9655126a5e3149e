"""The CPU prompt path that advances GDN's state without reading it (a prompt in attention mode with the state kept,
OryxMixer._advance_state_alone, each call's states computed for all layers at once by StagedStates) against the
generic path and float64: the recurrent state and conv windows it leaves for sharings kv, kv-proj and none on fresh
random weights and prompts, and every cache tensor under per-layer plans where only some layers take it;
grouped_final_state reading raw keys (normalised from its key products' diagonal) against the float64 loop; and
CausalConv's CPU shifted products against F.conv1d and a float64 loop. Each comparison reports the worst element
and the relative norm of the difference, and a deliberately wrong variant shows the comparison can fail."""
import pytest
import torch
import torch.nn.functional as F

from oryx_core.config import preset
from oryx_torch import cpu_linear
from oryx_torch import model as model_module
from oryx_torch.kernels.gdn.chunk_torch import _chunk_transitions, chunk_layout, grouped_final_state, head_major
from oryx_torch.kernels.gdn.naive import naive_recurrent_gated_delta_rule
from oryx_torch.model import CausalConv, OryxModel, StagedStates
from model_params import lively_params

SAME = 2e-5  # fp32 against the generic fp32 path or float64: the same function up to rounding


def errors(got, want) -> tuple[float, float]:
    """(worst element / largest reference element, norm of the difference / norm of the reference)."""
    got, want = got.detach().double(), want.detach().double()
    diff = (got - want).abs()
    return float(diff.max() / want.abs().max()), float(diff.norm() / want.norm())


def assert_close(got, want, what):
    worst, norm = errors(got, want)
    assert worst < SAME and norm < SAME, (what, worst, norm)


@pytest.mark.parametrize("bias, activation", [(False, "none"), (True, "silu")])
def test_cpu_conv_taps_match_conv1d_and_float64(bias, activation):
    gen = torch.Generator().manual_seed(5 + bias)
    B, T, C, W = 2, 41, 24, 4
    conv = CausalConv(C, W, bias, activation)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(C, W, generator=gen))
        if bias:
            conv.bias.copy_(torch.randn(C, generator=gen))
    x = torch.randn(B, T + 5, C, generator=gen)[:, 5:]  # a strided view, as the projections' columns are
    window = torch.randn(B, W - 1, C, generator=gen)
    inputs = torch.cat([window, x], 1).double()
    want = sum(inputs[:, j:j + T] * conv.weight.double()[:, j] for j in range(W))
    if bias:
        want = want + conv.bias.double()
    want = F.silu(want) if activation == "silu" else want
    with torch.no_grad():
        assert cpu_linear.applies(x)
        got, tail = conv(x, window)
        cpu_linear.ENABLED = False
        try:
            generic, generic_tail = conv(x, window)          # F.conv1d
        finally:
            cpu_linear.ENABLED = True
    assert_close(got, want, "float64")
    assert_close(got, generic, "conv1d")
    assert torch.equal(tail, generic_tail) and torch.equal(tail, x[:, -(W - 1):])
    assert torch.equal(conv.tail(x, window), tail) and torch.equal(conv.tail(x[:, :2], window),
                                                                     torch.cat([window[:, 2:], x[:, :2]], 1))
    assert errors(got[:, 1:], want[:, :-1])[1] > 1e-2  # one token off: the comparison can fail


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("initial", [False, True])
def test_final_state_from_raw_keys_against_float64(initial, factored):
    """grouped_final_state with key_norm_eps (raw keys, normalised inside) against the float64 loop over the
    L2-normalised keys, its chunks chained by their transitions or by their factors (`factored`); with the keys'
    norm left out (key_norm_eps None on raw keys) it fails."""
    gen = torch.Generator().manual_seed(11 + initial)
    B, T, Hkv, K, V, eps = 2, 150, 2, 16, 8, 1e-6
    k = torch.randn(B, T, Hkv, K, generator=gen) * 3
    v = torch.randn(B, T, Hkv, V, generator=gen)
    g = -torch.rand(B, T, Hkv, generator=gen) * 0.3
    beta = torch.rand(B, T, Hkv, generator=gen)
    state = torch.randn(B, Hkv, K, V, generator=gen) if initial else None
    kd = k.double()
    normed = kd * torch.rsqrt((kd * kd).sum(-1, keepdim=True) + eps)
    want = naive_recurrent_gated_delta_rule(normed, normed, v.double(), g.double(), beta.double(),
                                            initial_state=None if state is None else state.double(),
                                            output_final_state=True)[1]
    NT, C = chunk_layout(T, 64)
    packed = head_major([k, v, g, beta], NT * C)
    got = grouped_final_state(packed, K, NT, state, key_norm_eps=eps, factored=factored)
    assert_close(got, want, "float64")
    assert not errors(grouped_final_state(packed, K, NT, state, factored=factored), want)[1] < 1e-2  # (may be nan)
    with pytest.raises(ValueError, match="state only"):
        _chunk_transitions(packed.view(B * Hkv * NT, C, -1), K, with_outputs=True, key_norm_eps=eps)


def build(sharing, seed, **overrides):
    cfg = preset("tiny", "gdn", sharing=sharing, **overrides)
    model = OryxModel(cfg, seed=None)
    model.load_params(lively_params(cfg, seed))
    return model.eval()


def attention_prompt_cache(model, tokens, chunks):
    """The cache a prompt read in attention mode leaves (the state kept), fed in `chunks` pieces."""
    B, T = tokens.shape
    cache = model.make_cache(B, T + 1)
    with torch.no_grad():
        start = 0
        for size in chunks:
            model(tokens[:, start:start + size], True, cache=cache)
            start += size
    return cache


@pytest.mark.parametrize("sharing, overrides", [("kv", {}), ("kv-proj", {}), ("none", {}),
                                                ("kv-proj", dict(conv_bias=True, conv_activation="none"))])
def test_state_alone_against_the_generic_path(sharing, overrides, monkeypatch):
    """Prompts of 2 x 70 tokens (two chunks of the recurrence each, the second continuing the first's state and
    windows) and then 2 tokens (fewer than the conv window) in attention mode: every cache tensor against the path
    that computes the recurrence's outputs too (grouped_recurrence_applies off). A mutant (the keys' normalisation
    epsilon 1e-1 instead of 1e-6 in the fast path alone) is told apart."""
    model = build(sharing, seed=7)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 142), generator=gen)
    calls = []
    alone = model_module.grouped_final_state
    monkeypatch.setattr(model_module, "grouped_final_state", lambda *a, **kw: calls.append(1) or alone(*a, **kw))
    fast = attention_prompt_cache(model, tokens, (70, 70, 2))
    assert len(calls) == 3  # the fast path ran in every call, once for all layers (StagedStates)
    monkeypatch.setattr(model_module, "grouped_recurrence_applies", lambda q: False)
    generic = attention_prompt_cache(model, tokens, (70, 70, 2))
    monkeypatch.undo()
    for layer, (a, b) in enumerate(zip(fast.layers, generic.layers)):
        assert_close(a.recurrent, b.recurrent, (layer, "state"))
        assert a.recurrent.abs().max() > 1e-3
        for name in a.conv:
            assert_close(a.conv[name], b.conv[name], (layer, name))
    monkeypatch.setattr(model_module, "L2NORM_EPS", 1e-1)
    mutant = attention_prompt_cache(model, tokens, (70, 70, 2))
    assert max(errors(a.recurrent, b.recurrent)[1] for a, b in zip(mutant.layers, generic.layers)) > 1e-3


def cache_tensors(cache):
    """Every tensor of the cache, by (layer, name)."""
    out = {}
    for i, layer in enumerate(cache.layers):
        out.update({(i, name): t for name, t in (("keys", layer.keys), ("values", layer.values),
                                                  ("recurrent", layer.recurrent)) if t is not None})
        out.update({(i, "conv " + name): t for name, t in layer.conv.items()})
    return out


def per_layer_cache(model, tokens, layer_modes, chunks):
    """The cache per-layer plans (modes [L, B, T]) leave, the prompt fed in `chunks` pieces."""
    B, T = tokens.shape
    cache = model.make_cache(B, T + 1)
    with torch.no_grad():
        start = 0
        for size in chunks:
            model(tokens[:, start:start + size], layer_modes[:, :, start:start + size], cache=cache)
            start += size
    return cache


@pytest.mark.parametrize("sharing", ["kv", "kv-proj"])
def test_staged_states_under_per_layer_plans(sharing, monkeypatch):
    """Five layers under per-layer plans [L, B, T]: layers 0, 2 and 4 read every token in attention mode (their
    states staged and computed together after the last layer), layer 1 switches modes within the prompt and layer
    3 reads it recurrently (both computed where they run). Every cache tensor after prompts of 70 + 70 + 2 tokens
    against the path with the fast route off (grouped_recurrence_applies off) and against the fast route computing
    each layer's state where it runs (no StagedStates), the staged layers computed together and in groups of at
    most two; worst element and relative norm. A mutant that hands the staged layers' states to each other's caches
    (the slots' order reversed) is told apart."""
    model = build(sharing, seed=3, n_layers=5)
    gen = torch.Generator().manual_seed(3)
    B, T = 2, 142
    tokens = torch.randint(0, model.cfg.vocab_size, (B, T), generator=gen)
    layer_modes = torch.ones(5, B, T, dtype=torch.bool)
    layer_modes[1] = torch.rand(B, T, generator=gen) < 0.5
    layer_modes[3] = False
    chunks = (70, 70, 2)
    staged = []
    init = StagedStates.__init__
    monkeypatch.setattr(StagedStates, "__init__", lambda self, n: staged.append(self) or init(self, n))
    add = StagedStates.add
    monkeypatch.setattr(StagedStates, "add", lambda self, *a: add(self, *a) or staged.append(len(self.states)))
    fast = cache_tensors(per_layer_cache(model, tokens, layer_modes, chunks))
    assert [x for x in staged if isinstance(x, int)] == [1, 2, 3] * 3  # layers 0, 2 and 4 staged in each call
    assert B * model.cfg.n_kv_heads * 3 <= StagedStates.GROUP_ROWS  # (one group)
    monkeypatch.undo()
    monkeypatch.setattr(StagedStates, "GROUP_ROWS", 2 * B * model.cfg.n_kv_heads)  # layers 0 and 2, then 4
    grouped = cache_tensors(per_layer_cache(model, tokens, layer_modes, chunks))
    monkeypatch.setattr(model_module, "StagedStates", lambda n: None)
    alone = cache_tensors(per_layer_cache(model, tokens, layer_modes, chunks))
    monkeypatch.setattr(model_module, "grouped_recurrence_applies", lambda q: False)
    generic = cache_tensors(per_layer_cache(model, tokens, layer_modes, chunks))
    monkeypatch.undo()
    assert fast.keys() == generic.keys() and (0, "conv k_rec" if sharing == "kv-proj" else "keys") in fast
    for key, want in generic.items():
        assert_close(fast[key], want, (key, "generic"))
        assert_close(fast[key], alone[key], (key, "each layer alone"))
        assert_close(grouped[key], want, (key, "groups"))
    for layer in range(5):
        assert generic[layer, "recurrent"].abs().max() > 1e-3
    add = StagedStates.add
    monkeypatch.setattr(StagedStates, "add", lambda self, *a: add(self, *a) or self.states.insert(0, self.states.pop()))
    mutant = cache_tensors(per_layer_cache(model, tokens, layer_modes, chunks))
    assert min(errors(mutant[layer, "recurrent"], generic[layer, "recurrent"])[1] for layer in (0, 4)) > 1e-2
