"""CausalConv's compiled form (causal_conv_taps: W shifted products, which inductor fuses) against its eager
F.conv1d form and a float64 loop written out here: outputs, carried windows, and the gradients of the input,
window, weight and bias, with and without right padding."""
import numpy as np
import pytest
import torch

from oryx_torch.model import CausalConv, causal_conv_taps


def loop_conv(x, window, weight, bias, silu):
    """float64 per-token causal depthwise conv: out[t] = sum_j inputs[t - (W-1) + j] * weight[:, j]."""
    W = weight.shape[1]
    inputs = torch.cat([window.double(), x.double()], dim=1)
    out = torch.stack([(inputs[:, t:t + W] * weight.double().t()).sum(1) for t in range(x.shape[1])], dim=1)
    if bias is not None:
        out = out + bias.double()
    return torch.nn.functional.silu(out) if silu else out


def errors(got, want):
    diff = (got.double() - want.double()).abs()
    return float(diff.max() / want.double().abs().max()), float(diff.norm() / want.double().norm())


@pytest.mark.parametrize("bias, activation, ragged", [(False, "none", False), (True, "silu", False),
                                                       (True, "silu", True)])
def test_compiled_conv_matches_eager_and_float64(bias, activation, ragged):
    gen = torch.Generator().manual_seed(3 + 2 * bias + ragged)
    B, T, C, W = 3, 37, 24, 4
    conv = CausalConv(C, W, bias, activation).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(C, W, generator=gen, dtype=torch.float64))
        if bias:
            conv.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    window = torch.randn(B, W - 1, C, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([T, 20, 1]) if ragged else None
    upstream = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    results = {}
    for name, forward in (("compiled", compiled), ("eager", conv), ("loop", None)):
        conv.zero_grad(set_to_none=True)
        xi, wi = x.clone().requires_grad_(), window.clone().requires_grad_()
        if forward is None:
            out = loop_conv(xi, wi, conv.weight, conv.bias, activation == "silu")
            tail = None
        else:
            out, tail = forward(xi, wi, lengths)
        (out * upstream).sum().backward()
        results[name] = [out, tail, xi.grad, wi.grad, conv.weight.grad] + ([conv.bias.grad] if bias else [])
    for other in ("eager", "loop"):
        for i, (got, want) in enumerate(zip(results["compiled"], results[other])):
            if want is None:
                continue
            worst, norm = errors(got, want)
            assert worst < 1e-12 and norm < 1e-12, (other, i, worst, norm)


def test_taps_round_through_fp32_for_16_bit_inputs():
    """bf16 inputs: the products are summed in fp32 and rounded once, so the result is the float64 sum rounded
    to bf16 (within one bf16 step), as F.conv1d's fp32 accumulation gives."""
    gen = torch.Generator().manual_seed(9)
    padded = torch.randn(2, 50 + 3, 16, generator=gen).to(torch.bfloat16)
    weight = torch.randn(16, 4, generator=gen)
    got = causal_conv_taps(padded, weight, 50)
    want = sum(padded[:, j:j + 50].double() * weight[:, j].double() for j in range(4))
    assert got.dtype == torch.bfloat16
    assert float(((got.double() - want).abs() / want.abs().clamp_min(1e-3)).max()) < 2 ** -8
    np.testing.assert_array_equal(got.float().numpy(), want.to(torch.bfloat16).float().numpy())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_conv_on_cuda_matches_eager(dtype):
    """causal_conv_taps as inductor compiles it on CUDA against the eager F.conv1d form: output, window and the
    gradients of input, weight and bias (fp32 within 1e-5; bf16, whose eager conv rounds the weight to bf16
    first, within 2e-2)."""
    gen = torch.Generator().manual_seed(21)
    B, T, C, W = 4, 300, 192, 4
    conv = CausalConv(C, W, True, "silu")
    with torch.no_grad():
        conv.weight.copy_(torch.randn(C, W, generator=gen))
        conv.bias.copy_(torch.randn(C, generator=gen))
    conv = conv.cuda()
    x = torch.randn(B, T, C, generator=gen).to("cuda", dtype)
    upstream = torch.randn(B, T, C, generator=gen).to("cuda", dtype)
    torch._dynamo.reset()
    results = {}
    for name, forward in (("inductor", torch.compile(conv, fullgraph=True)), ("eager", conv)):
        conv.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out, tail = forward(xi)
        (out.float() * upstream.float()).sum().backward()
        results[name] = [out, tail, xi.grad, conv.weight.grad, conv.bias.grad]
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (got, want) in enumerate(zip(results["inductor"], results["eager"])):
        worst, norm = errors(got, want)
        assert worst < bound and norm < bound, (i, worst, norm)
