"""The CPU inference products (oryx_torch.cpu_linear: oneDNN with reordered weights and fused epilogues) against
float64 on fresh random inputs, worst element and relative norm; a model's prompt through them against the float64
reference and against F.linear's path; reordered weights follow weight writes; the one-thread MKL block."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oryx_core.config import preset
from oryx_core.reference import OryxReference
from oryx_torch import cpu_linear
from oryx_torch.model import OryxModel
from model_params import lively_params
from error_metrics import relative_error

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this torch has no oneDNN linear")

PRODUCT_TOL = 5e-6   # one fp32 product of up to 1536 terms (and its epilogue) against float64
TOL = 1e-4           # a model's logits against the float64 reference, as in test_model.py
SAME = 1e-5          # against the F.linear path: the same function up to rounding


@pytest.mark.parametrize("rows, inner, out", [(1, 576, 960), (3, 64, 40), (400, 576, 3072), (37, 1536, 576)])
def test_products_against_float64(rows, inner, out):
    gen = torch.Generator().manual_seed(rows + inner)
    x = torch.randn(2, rows, inner, generator=gen)
    w = torch.randn(out, inner, generator=gen) * inner ** -0.5
    other = torch.randn(2, rows, out, generator=gen)
    packed = cpu_linear.reorder(w)
    exact = x.double() @ w.double().t()
    cases = {"none": (cpu_linear.linear(x, packed), exact),
             "swish": (cpu_linear.linear(x, packed, "swish"), F.silu(exact)),
             "add": (cpu_linear.linear_add(x, packed, other), exact + other.double()),
             "mul": (cpu_linear.linear_mul(x, packed, other), exact * other.double())}
    for name, (got, want) in cases.items():
        assert got.shape == want.shape and got.dtype == torch.float32, name
        assert relative_error(got, want) < PRODUCT_TOL, (name, relative_error(got, want))
    # F.linear's own rounding is of the same order; a weight one row off is far outside the bound
    assert relative_error(F.linear(x, w), exact) < PRODUCT_TOL
    assert relative_error(cpu_linear.linear(x, cpu_linear.reorder(w.roll(1, 0))), exact) > 0.1


def test_applies_only_to_fp32_cpu_inference():
    x = torch.ones(2, 3)
    assert not cpu_linear.applies(x)  # gradients on (pytest's default)
    with torch.no_grad():
        assert cpu_linear.applies(x)
        assert not cpu_linear.applies(x.double()) and not cpu_linear.applies(x.bfloat16())
    with torch.inference_mode():
        assert cpu_linear.applies(x)


def build(seed, **overrides):
    cfg = preset("tiny", "gdn", **overrides)
    params = lively_params(cfg, seed)
    model = OryxModel(cfg, seed=None)
    model.load_params(params)
    return model.eval(), OryxReference(cfg, params)


PLANS = {"attention": lambda T: np.ones(T, bool), "recurrent": lambda T: np.zeros(T, bool),
         "prefill-attention": lambda T: np.ones(T, bool)}


def prompt(model, tokens, plan):
    """A prompt into a fresh cache under `plan` (attention: the state dropped, as `oryx generate` does): the last
    token's logits and the cache's tensors."""
    B, T = tokens.shape
    cache = model.make_cache(B, T + 1)
    if plan == "attention":
        cache.drop_recurrent()
    with torch.inference_mode():
        logits = model(torch.tensor(tokens), torch.tensor(PLANS[plan](T)), cache=cache, last_only=True)
    return logits[:, -1].numpy(), [t.clone() for layer in cache.layers for t in layer.tensors()]


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("overrides", [{}, dict(n_kv_heads=2)])
def test_prompt_through_cpu_products_against_reference(plan, overrides, monkeypatch):
    model, ref = build(seed=5, **overrides)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, model.cfg.vocab_size, (2, 70))
    used = []
    linear = cpu_linear.linear
    monkeypatch.setattr(cpu_linear, "linear", lambda *a, **k: used.append(1) or linear(*a, **k))
    got, cache = prompt(model, tokens, plan)
    assert len(used) >= 2 * model.cfg.n_layers  # each layer's input projections and MLP
    want = ref.forward(tokens, PLANS[plan](70)[None].repeat(2, 0))[0][:, -1]
    assert relative_error(got, want) < TOL
    monkeypatch.setattr(cpu_linear, "ENABLED", False)
    plain, plain_cache = prompt(model, tokens, plan)
    assert relative_error(got, plain) < SAME
    for a, b in zip(cache, plain_cache):
        assert relative_error(a, b) < SAME


def test_reordered_weights_follow_weight_writes():
    """A versioned in-place write, and a write behind autograd's back followed by train()/eval() (what a fused
    optimizer step between evaluations does): the next prompt reads the new weights, as a fresh model does."""
    model, _ = build(seed=6)
    tokens = np.random.default_rng(6).integers(0, model.cfg.vocab_size, (1, 20))
    before = prompt(model, tokens, "prefill-attention")[0]
    with torch.no_grad():
        model.layers[0].mixer.k_proj.weight.mul_(1.5)
        model.layers[1].mlp.down_proj.weight.mul_(0.5)
    versioned = prompt(model, tokens, "prefill-attention")[0]
    model.train()
    model.layers[0].mlp.up_proj.weight.data.mul_(2.0)
    model.layers[1].mixer.q_rec.weight.data.mul_(-1.0)
    model.eval()
    unversioned = prompt(model, tokens, "prefill-attention")[0]
    fresh = OryxModel(model.cfg, seed=None)
    fresh.load_state_dict(model.state_dict())
    assert relative_error(versioned, before) > 1e-2
    assert relative_error(unversioned, versioned) > 1e-2
    assert relative_error(unversioned, prompt(fresh.eval(), tokens, "prefill-attention")[0]) < SAME


def test_mkl_one_thread_restores_and_solves_alike():
    gen = torch.Generator().manual_seed(7)
    L = torch.randn(5, 20, 20, generator=gen).tril(-1) * 0.3
    rhs = torch.randn(5, 8, 20, generator=gen)
    want = torch.linalg.solve_triangular(L.double(), rhs.double(), upper=False, left=False, unitriangular=True)
    threads = torch.get_num_threads()
    with cpu_linear.mkl_one_thread():
        got = torch.linalg.solve_triangular(L, rhs, upper=False, left=False, unitriangular=True)
    assert torch.get_num_threads() == threads
    assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("variant", ["default", "o_norm_all", "no_gate_no_norm_no_mlp", "untied_no_rope_silu",
                                     "retrofitted_llama"])
@pytest.mark.parametrize("sharing", ["kv", "none", "qkv"])
def test_last_token_alone_against_reference(variant, sharing, monkeypatch):
    """A prompt whose logits only the last token's are read (`last_only`), in attention mode with the state dropped
    or kept, into a fresh cache and continuing one: the last layer computes that token alone (its query, attention
    row, output and MLP); logits and every cache tensor against the float64 reference and the full computation."""
    from torch_models import VARIANTS

    model, ref = build(seed=8, sharing=sharing, n_kv_heads=2, **VARIANTS[variant])
    rng = np.random.default_rng(8)
    tokens = rng.integers(0, model.cfg.vocab_size, (2, 50))
    rows = []
    attention = model.layers[-1].mixer._attention
    monkeypatch.setattr(model.layers[-1].mixer, "_attention",
                        lambda *a, **k: rows.append(a[-1] if len(a) > 6 else k.get("last_row")) or attention(*a, **k))
    modes = np.ones((2, 50), bool)
    want = ref.forward(tokens, modes)[0]
    for keep_state in (False, True):
        caches, logits = [], []
        for last_only in (True, False):
            cache = model.make_cache(2, 51)
            if not keep_state:
                cache.drop_recurrent()
            with torch.inference_mode():
                model(torch.tensor(tokens[:, :30]), True, cache=cache, last_only=last_only)
                logits.append(model(torch.tensor(tokens[:, 30:]), True, cache=cache, last_only=last_only)[:, -1])
            caches.append([t.clone() for layer in cache.layers for t in layer.tensors()])
        assert relative_error(logits[0], want[:, -1]) < TOL
        assert relative_error(logits[0], logits[1]) < SAME
        for a, b in zip(*caches):
            assert relative_error(a, b) < SAME
    assert rows == [True, True, False, False] * 2  # the last-token path ran where asked


@pytest.mark.parametrize("variant", ["default", "conv_bias_gate_before_norm", "o_norm_all", "untied_no_rope_silu",
                                     "retrofitted_llama"])
@pytest.mark.parametrize("sharing", ["kv", "none"])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_last_recurrent_token_alone_against_reference(variant, sharing, kv_heads, monkeypatch):
    """An all-recurrent prompt read through its last token (`last_only`): the last layer advances the state alone and
    reads it with that token's query; logits against the float64 reference and the full computation, every cache
    tensor against the full computation's, fresh and continued caches (the second call shorter than the conv
    window), and without a cache."""
    from torch_models import VARIANTS

    model, ref = build(seed=9, sharing=sharing, n_kv_heads=kv_heads, **VARIANTS[variant])
    tokens = np.random.default_rng(9).integers(0, model.cfg.vocab_size, (2, 50))
    readouts = []
    readout = model.layers[-1].mixer._last_token_readout
    monkeypatch.setattr(model.layers[-1].mixer, "_last_token_readout",
                        lambda *a: readouts.append(1) or readout(*a))
    for cut in (30, 48):  # 48: the continuation (2 tokens) is shorter than the conv window
        want = ref.forward(tokens, np.zeros((2, 50), bool))[0][:, -1]
        logits, caches = [], []
        for last_only in (True, False):
            cache = model.make_cache(2, 51)
            with torch.inference_mode():
                model(torch.tensor(tokens[:, :cut]), False, cache=cache, last_only=last_only)
                logits.append(model(torch.tensor(tokens[:, cut:]), False, cache=cache, last_only=last_only)[:, -1])
            caches.append([t.clone() for layer in cache.layers for t in layer.tensors()])
        assert relative_error(logits[0], want) < TOL
        assert relative_error(logits[0], logits[1]) < SAME
        for a, b in zip(*caches):
            assert relative_error(a, b) < SAME
    with torch.inference_mode():
        alone = model(torch.tensor(tokens), False, last_only=True)[:, -1]
        full = model(torch.tensor(tokens), False)[:, -1]
    assert relative_error(alone, full) < SAME
    assert len(readouts) == 5  # two calls per cache, one without
