"""The batched one-token recurrences the CPU decode step runs (gated_delta_rule_step_torch, ssd_step_torch)
against the per-token loops in float64: output and the state they update in place, at batch 5."""
import torch

from oryx_torch.kernels.gdn.naive import gated_delta_rule_step_torch, naive_recurrent_gated_delta_rule
from oryx_torch.kernels.mamba2.naive import naive_recurrent_ssd, ssd_step_torch
from error_metrics import relative_error

B, H, K, V = 5, 3, 8, 16


def inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(B, H, K, generator=gen), dim=-1)
    v = torch.randn(B, H, V, generator=gen)
    return gen, q, k, v, torch.randn(B, H, K, V, generator=gen)


def one_token(*tensors):
    return [t[:, None].double() for t in tensors]


def test_gdn_step_matches_the_loop():
    gen, q, k, v, state = inputs(0)
    g, beta = -torch.rand(B, H, generator=gen) * 2, torch.rand(B, H, generator=gen)
    got_state = state.clone()
    got = gated_delta_rule_step_torch(q, k, v, g, beta, got_state, scale=0.3)
    want, want_state = naive_recurrent_gated_delta_rule(*one_token(q, k, v, g, beta), scale=0.3,
                                                        initial_state=state.double(), output_final_state=True)
    assert relative_error(got, want[:, 0]) < 1e-6
    assert relative_error(got_state, want_state) < 1e-6
    assert relative_error(got_state, state) > 1e-2  # the state moved


def test_ssd_step_matches_the_loop():
    gen, q, k, v, state = inputs(1)
    dt, A, D = torch.rand(B, H, generator=gen), -torch.rand(H, generator=gen), torch.randn(H, generator=gen)
    for skip in (D, None):
        got_state = state.clone()
        got = ssd_step_torch(q, k, v, dt, A, skip, got_state)
        want, want_state = naive_recurrent_ssd(*one_token(q, k, v, dt), A.double(),
                                               None if skip is None else skip.double(),
                                               initial_state=state.double(), output_final_state=True)
        assert relative_error(got, want[:, 0]) < 1e-6
        assert relative_error(got_state, want_state) < 1e-6
