"""The PyTorch model over sequences that cross several 64-token chunks of the chunked recurrence (the path CPU
and every long prefill take), against the float64 reference: logits under mixed plans, and gradients.

Errors are judged two ways: the relative Frobenius norm over all logits, and the worst single element against
the logits' largest magnitude, so that one wrong position (a chunk boundary, a mode switch) cannot hide in a
norm over thousands of good ones.
"""
import numpy as np
import pytest
import torch

from oryx_core.config import preset
from oryx_core.reference import OryxReference
from oryx_torch.model import OryxModel
from model_params import lively_params

T = 200  # chunks 0-63, 64-127, 128-191 and a ragged 192-199
FP32_TOL = 1e-4
# A float64 OryxModel still computes its norms, gates and RoPE angles in float32, so it agrees with the float64
# reference to about 1e-6 in the logits and 2e-5 in a directional derivative; a gradient that loses a term (a
# state not carried across a chunk, a mode's branch cut off) is off by far more.
GRAD_TOL = 1e-4


def errors(got, want) -> tuple[float, float]:
    """(relative Frobenius error, worst element error relative to max |want|)."""
    got, want = (np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, np.float64) for x in (got, want))
    diff = np.abs(got - want)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want)), float(diff.max() / np.abs(want).max())


def plans(rng, B):
    """Plans whose switches fall inside chunks, on chunk edges, and differ per sequence."""
    t = np.arange(T)
    per_sequence = np.repeat(rng.random((B, -(-T // 24))) < 0.5, 24, axis=1)[:, :T]  # 24-token runs cross 64
    return {
        "attention": np.ones(T, bool),
        "recurrent": np.zeros(T, bool),
        "A-R-A inside chunks": (t < 50) | (t >= 170),
        "R-A-R on chunk edges": (t >= 64) & (t < 128),
        "per sequence": per_sequence,
    }


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_long_mixed_plans_match_the_reference(mixer):
    cfg = preset("tiny", mixer)
    params = lively_params(cfg, seed=5)
    model = OryxModel(cfg, seed=None)
    model.load_params(params)
    model.eval()
    ref = OryxReference(cfg, params)
    rng = np.random.default_rng(1)
    B = 2
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    outputs = {}
    for name, modes in plans(rng, B).items():
        want = ref.forward(tokens, modes)[0]
        with torch.no_grad():
            got = model(torch.tensor(tokens), torch.tensor(np.broadcast_to(modes, (B, T)).copy()))
        frobenius, worst = errors(got, want)
        assert frobenius < FP32_TOL and worst < FP32_TOL, (name, frobenius, worst)
        outputs[name] = got
    frobenius, worst = errors(outputs["attention"], outputs["recurrent"])
    assert frobenius > 1e-2 and worst > 1e-2  # the two modes really compute different things here


def reference_loss(ref: OryxReference, tokens, modes, weights) -> float:
    return float((ref.forward(tokens, modes)[0] * weights).sum())


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_gradients_match_finite_differences_of_the_reference(mixer):
    """The torch model in float64: its autograd gradient, read along a few directions in parameter space, equals the
    central difference of the float64 reference's loss along the same directions."""
    cfg = preset("tiny", mixer)
    params = {n: p.astype(np.float64) for n, p in lively_params(cfg, seed=6).items()}
    model = OryxModel(cfg, seed=None).double()
    model.load_params(params)
    rng = np.random.default_rng(2)
    B, length = 1, 150  # chunks 0-63, 64-127, 128-149
    tokens = rng.integers(0, cfg.vocab_size, (B, length))
    t = np.arange(length)
    modes = (t < 40) | ((t >= 100) & (t < 120))  # A, then R across a chunk edge, A inside a chunk, R
    weights = rng.normal(size=(B, length, cfg.vocab_size))
    logits = model(torch.tensor(tokens), torch.tensor(np.broadcast_to(modes, (B, length)).copy()))
    (logits * torch.tensor(weights)).sum().backward()
    grads = {n: p.grad.detach().numpy() for n, p in model.named_parameters()}

    def direction(names):
        return {n: (rng.normal(size=params[n].shape) if n in names else np.zeros_like(params[n])) for n in params}

    groups = {
        "every parameter": list(params),
        "recurrent-only": [n for n in params if any(s in n for s in ("q_rec", "conv_q", "A_log", "dt_bias", ".a_proj",
                                                                      ".b_proj", "dt_proj", "D_skip"))],
        "attention query": [n for n in params if "q_attn" in n],
        "shared keys and values": [n for n in params if any(s in n for s in ("k_proj", "v_proj", "conv_k", "conv_v"))],
    }
    ref_plus, ref_minus = OryxReference(cfg, dict(params)), OryxReference(cfg, dict(params))
    eps = 1e-6
    for name, names in groups.items():
        assert names, name
        d = direction(names)
        analytic = sum(float((grads[n] * d[n]).sum()) for n in names)
        for n in names:
            ref_plus.p[n] = params[n] + eps * d[n]
            ref_minus.p[n] = params[n] - eps * d[n]
        numeric = (reference_loss(ref_plus, tokens, modes, weights)
                   - reference_loss(ref_minus, tokens, modes, weights)) / (2 * eps)
        for n in names:
            ref_plus.p[n] = ref_minus.p[n] = params[n]
        assert abs(analytic - numeric) <= GRAD_TOL * max(1.0, abs(numeric)), (name, analytic, numeric)


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_prefill_in_pieces_that_end_inside_chunks_matches_the_reference(mixer):
    """A cached prefill in pieces of 100, 70 and 30 tokens: each piece restarts the chunked recurrence from the
    cached state at an offset that is not a multiple of 64, under a plan that switches inside the pieces."""
    cfg = preset("tiny", mixer)
    params = lively_params(cfg, seed=7)
    model = OryxModel(cfg, seed=None)
    model.load_params(params)
    model.eval()
    rng = np.random.default_rng(3)
    B = 2
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    t = np.arange(T)
    modes = (t < 30) | ((t >= 90) & (t < 140)) | (t >= 185)
    want = OryxReference(cfg, params).forward(tokens, modes)[0]
    cache = model.make_cache(B, T)
    pieces = []
    with torch.no_grad():
        for start, stop in ((0, 100), (100, 170), (170, T)):
            pieces.append(model(torch.tensor(tokens[:, start:stop]), torch.tensor(modes[start:stop]), cache=cache))
    frobenius, worst = errors(torch.cat(pieces, dim=1), want)
    assert frobenius < FP32_TOL and worst < FP32_TOL, (frobenius, worst)
