"""How CUDA attends under a plan that mixes modes: FlexAttention over the query blocks holding an attention token,
or causal SDPA over every row (attention.MIXED_ATTENTION); "auto" decides by the share of the causal score matrix
those blocks cover."""
import numpy as np
import pytest
import torch

from oryx_torch import attention
from oryx_torch.attention import AttentionPlan


def plan(rows, offset=0):
    modes = torch.tensor(np.asarray(rows, dtype=bool))
    return AttentionPlan(modes, offset, modes)


def test_active_area_weights_query_blocks_by_the_keys_they_read():
    T = 256  # two query blocks of 128, reading 1 and 2 key blocks
    first_only = np.zeros(T, bool)
    first_only[5] = True
    second_only = np.zeros(T, bool)
    second_only[200] = True
    assert plan([np.ones(T, bool)]).active_area() == 1.0
    assert plan([first_only]).active_area() == pytest.approx(1 / 3)
    assert plan([second_only]).active_area() == pytest.approx(2 / 3)
    assert plan([second_only, np.zeros(T, bool)]).active_area() == pytest.approx(1 / 3)  # summed over the batch
    assert plan([first_only[:130]]).active_area() == pytest.approx(1 / 3)  # a partial last block counts whole


def test_dense_or_flex(monkeypatch):
    T = 256
    sparse, dense = np.zeros(T, bool), np.zeros(T, bool)
    sparse[:10] = True   # area 1/3
    dense[130:] = True   # area 2/3
    monkeypatch.setattr(attention, "DENSE_FROM", 0.5)
    monkeypatch.setattr(attention, "MIXED_ATTENTION", "auto")
    assert not plan([sparse]).dense_attention() and plan([dense]).dense_attention()
    assert not plan([dense], offset=64).dense_attention()  # queries after a cache: FlexAttention's offsets
    assert plan([np.ones(T, bool)]).dense_attention()
    monkeypatch.setattr(attention, "MIXED_ATTENTION", "flex")
    assert not plan([dense]).dense_attention()
    monkeypatch.setattr(attention, "MIXED_ATTENTION", "dense")
    assert plan([sparse]).dense_attention()


@pytest.mark.gpu
def test_cuda_dense_and_flex_give_the_same_model():
    """A mixed plan's logits and gradients on CUDA are the same through FlexAttention and through dense SDPA."""
    from oryx_core.config import preset
    from oryx_torch.model import OryxModel
    from model_params import lively_params
    from error_metrics import relative_error

    cfg = preset("tiny", "gdn").replace(head_dim=32, value_head_dim=32)
    model = OryxModel(cfg, seed=None)
    model.load_params(lively_params(cfg, 2))
    model = model.cuda()
    rng = np.random.default_rng(0)
    tokens = torch.tensor(rng.integers(0, cfg.vocab_size, (2, 300)), device="cuda")
    modes = torch.tensor(np.repeat(rng.random((2, 5)) < 0.5, 64, axis=1)[:, :300], device="cuda")
    results = {}
    default = attention.MIXED_ATTENTION
    for how in ("flex", "dense"):
        attention.MIXED_ATTENTION = how
        try:
            logits = model(tokens, modes)
            grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()), allow_unused=True)
        finally:
            attention.MIXED_ATTENTION = default
        results[how] = (logits, grads)
    assert relative_error(results["dense"][0], results["flex"][0]) < 1e-3
    for g_dense, g_flex in zip(results["dense"][1], results["flex"][1]):
        if g_flex is not None:
            assert relative_error(g_dense, g_flex) < 1e-3
