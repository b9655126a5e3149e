"""Gated DeltaNet kernels: torch references on CPU, Triton kernels on a GPU.

The Triton kernels on CPU (TRITON_INTERPRET=1) are tested in test_gdn_triton_interpret.py.
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from oryx_torch.kernels.gdn import (  # noqa: E402
    chunk_gated_delta_rule_torch,
    fed_fp32,
    gated_delta_rule,
    naive_recurrent_gated_delta_rule,
)
from gdn_inputs import random_inputs  # noqa: E402
from error_metrics import relative_error as worst_relative_error  # noqa: E402

F64 = torch.float64


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite values in output"
    return worst_relative_error(out, ref)


def numpy_gated_delta_rule(q, k, v, g, beta, scale, h0, bounds):
    """Independent float64 loop over tokens, one head at a time, on flattened [tokens, H, D]."""
    o = np.zeros(v.shape)
    finals = []
    for n, (bos, eos) in enumerate(bounds):
        per_head = []
        for h in range(q.shape[1]):
            S = h0[n, h].copy()
            for t in range(bos, eos):
                S = np.exp(g[t, h]) * (S - beta[t, h] * np.outer(k[t, h], k[t, h] @ S)) \
                    + beta[t, h] * np.outer(k[t, h], v[t, h])
                o[t, h] = scale * (S.T @ q[t, h])
            per_head.append(S)
        finals.append(np.stack(per_head))
    return o, np.stack(finals)


@pytest.mark.parametrize("packed", [False, True])
def test_naive_matches_numpy_loop(packed):
    q, k, v, g, beta, h0 = random_inputs(2, 11, 2, 8, 12, F64, seed=1, num_seqs=3 if packed else 2)
    if packed:
        q, k, v, g, beta = (x.reshape(1, 22, *x.shape[2:]) for x in (q, k, v, g, beta))
        cu_seqlens = torch.tensor([0, 5, 5, 22])
        bounds = [(0, 5), (5, 5), (5, 22)]
    else:
        cu_seqlens, bounds = None, [(0, 11), (11, 22)]
    o, final = naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=h0,
                                                output_final_state=True, cu_seqlens=cu_seqlens)
    flat = [x.reshape(22, *x.shape[2:]).numpy() for x in (q, k, v, g, beta)]
    o_ref, final_ref = numpy_gated_delta_rule(*flat, 0.3, h0.numpy(), bounds)
    assert rel_err(o.reshape(22, 2, 12), torch.from_numpy(o_ref)) < 1e-13
    assert rel_err(final, torch.from_numpy(final_ref)) < 1e-13


CHUNK_CASES = [
    # B, T, H, K, V, chunk_size, with_state, cu_seqlens
    (2, 37, 2, 16, 32, 16, True, None),        # ragged last chunk, K != V
    (1, 70, 3, 32, 16, 64, False, None),       # T not a multiple of 64
    (1, 45, 2, 16, 16, 8, True, [0, 7, 7, 30, 45]),  # packed, one empty sequence
]


@pytest.mark.parametrize("B,T,H,K,V,chunk_size,with_state,cu", CHUNK_CASES)
def test_chunk_torch_matches_naive_fp64(B, T, H, K, V, chunk_size, with_state, cu):
    cu_seqlens = None if cu is None else torch.tensor(cu)
    num_seqs = B if cu is None else len(cu) - 1
    q, k, v, g, beta, h0 = random_inputs(B, T, H, K, V, F64, seed=2, with_state=with_state, num_seqs=num_seqs)
    ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                           cu_seqlens=cu_seqlens)
    out = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                       cu_seqlens=cu_seqlens, chunk_size=chunk_size)
    assert rel_err(out[0], ref[0]) < 1e-10
    assert rel_err(out[1], ref[1]) < 1e-10


def test_chunk_torch_gradients_match_naive_fp64():
    inputs = random_inputs(1, 21, 2, 8, 16, F64, seed=3, num_seqs=2)
    cu_seqlens = torch.tensor([0, 9, 21])
    grad_o = torch.randn(1, 21, 2, 16, dtype=F64)
    grad_final = torch.randn(2, 2, 8, 16, dtype=F64)

    def grads(fn, **kwargs):
        leaves = [x.clone().requires_grad_() for x in inputs]
        o, final = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, cu_seqlens=cu_seqlens, **kwargs)
        torch.autograd.backward([o, final], [grad_o, grad_final])
        return [x.grad for x in leaves]

    ref = grads(naive_recurrent_gated_delta_rule)
    out = grads(chunk_gated_delta_rule_torch, chunk_size=4)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "h0"), out, ref):
        assert rel_err(a, b) < 1e-10, name


def test_dispatcher_on_cpu_picks_torch_and_honours_impl(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, g, beta, h0 = random_inputs(1, 10, 2, 16, 16, F64, seed=4)
    ref, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    for impl in ("auto", "torch", "naive"):
        out, final = gated_delta_rule(q, k, v, g, beta, initial_state=h0, impl=impl)
        assert final is None
        assert rel_err(out, ref) < 1e-12, impl
    with pytest.raises(ValueError, match="impl"):
        gated_delta_rule(q, k, v, g, beta, impl="cuda")


def test_fed_fp32_hands_the_kernel_fp32_and_returns_the_callers_dtype():
    q, k, v, g, beta, h0 = random_inputs(1, 20, 2, 16, 16, torch.bfloat16, seed=5)
    seen = []

    def kernel(q, k, v, g, beta, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return gated_delta_rule(q, k, v, g, beta, impl="torch", **kwargs)

    o, final = fed_fp32(kernel)(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert seen == [(torch.float32,) * 3] and o.dtype == torch.bfloat16 and final.dtype == torch.float32
    ref, ref_final = gated_delta_rule(q.float(), k.float(), v.float(), g, beta, initial_state=h0,
                                      output_final_state=True, impl="torch")
    assert torch.equal(o, ref.to(torch.bfloat16)) and torch.equal(final, ref_final)


def test_launch_shapes_follow_the_card_the_pair_count_and_tma(monkeypatch):
    pytest.importorskip("triton")
    from oryx_torch.kernels.gdn import chunk

    gpu = torch.device("cuda", 0)  # only its type and index are read once the card lookups are replaced
    monkeypatch.setattr(chunk, "_sm_count", lambda index: 132)
    bf16 = dict(K=128, V=128, dtype=torch.bfloat16, device=gpu)
    monkeypatch.setattr(chunk, "_card", lambda index: None)
    for kernel in chunk.LAUNCH:                # a card without rows of its own takes LAUNCH, never TMA
        assert chunk._launch_args(kernel, pairs=256, **bf16) == chunk.LAUNCH[kernel], kernel
    for kernel in chunk.FEW_PAIRS_LAUNCH:
        assert chunk._launch_args(kernel, pairs=64, **bf16) == chunk.FEW_PAIRS_LAUNCH[kernel], kernel

    monkeypatch.setattr(chunk, "_card", lambda index: "H100")
    h100 = chunk.CARD_LAUNCH["H100"]
    # 16-bit inputs, heads up to 128 wide, whole chunks: the TMA rows
    assert chunk._launch_args("chunk_bwd", **bf16) == h100["tma"]["chunk_bwd"]
    assert chunk._launch_args("state_bwd", pairs=256, **bf16) == h100["tma"]["state_bwd"]
    assert chunk._launch_args("state_fwd", pairs=256, **bf16) == chunk.LAUNCH["state_fwd"]
    for kernel in ("state_fwd", "state_bwd"):
        assert chunk._launch_args(kernel, pairs=64, **bf16) == h100["tma"]["few_pairs"][kernel]
    assert chunk._launch_args("state_fwd", 64, 128, torch.float16, pairs=8, device=gpu)["TMA"]
    # where TMA can't be used, the card's rows without it (each measured so)
    for untuned in (dict(dtype=torch.float32), dict(K=256), dict(whole_chunks=False)):
        call = {**bf16, **untuned}
        assert chunk._launch_args("chunk_bwd", **call) == {**h100["chunk_bwd"], "BK": 64, "BV": 64}, untuned
        for pairs in (64, 256):
            assert "TMA" not in chunk._launch_args("state_bwd", pairs=pairs, **call), untuned
    assert chunk._launch_args("state_bwd", pairs=64, whole_chunks=False, **bf16) == chunk.FEW_PAIRS_LAUNCH["state_bwd"]
    # the interpreter (a CPU device) never reads the card
    assert chunk._launch_args("chunk_bwd", 128, 128, torch.bfloat16, device=torch.device("cpu")) == chunk.LAUNCH["chunk_bwd"]


@pytest.mark.parametrize("bad, match", [
    (dict(k_shape=(1, 10, 2, 8)), "k must have"),
    (dict(g_shape=(1, 10)), "g must be"),
    (dict(cu_seqlens=[0, 4, 9]), "end at T"),
    (dict(state_shape=(2, 2, 16, 16)), "initial_state"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    q, k, v, g, beta, h0 = random_inputs(1, 10, 2, 16, 16, F64, seed=5)
    if "k_shape" in bad:
        k = torch.randn(*bad["k_shape"], dtype=F64)
    if "g_shape" in bad:
        g = torch.randn(*bad["g_shape"], dtype=F64)
    if "state_shape" in bad:
        h0 = torch.randn(*bad["state_shape"])
    cu = torch.tensor(bad["cu_seqlens"]) if "cu_seqlens" in bad else None
    for fn in (naive_recurrent_gated_delta_rule, chunk_gated_delta_rule_torch):
        with pytest.raises(ValueError, match=match):
            fn(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu)


# ----------------------------------------------------------------------------- GPU
def _gpu_reference(inputs, cu_seqlens, grad_o, grad_final):
    """fp64 chunked-torch outputs and gradients (checked against naive above); no state in or
    out when grad_final is None."""
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    o, final = chunk_gated_delta_rule_torch(*leaves[:5], initial_state=leaves[5],
                                            output_final_state=grad_final is not None, cu_seqlens=cu_seqlens)
    if grad_final is None:
        o.backward(grad_o.double())
    else:
        torch.autograd.backward([o, final], [grad_o.double(), grad_final.double()])
    return o, final, [None if x is None else x.grad for x in leaves]


GPU_CASES = [
    # B, T, H, K, V, dtype, cu_seqlens, state in and out, tolerance
    (2, 300, 4, 128, 128, torch.bfloat16, None, True, 1e-2),
    # the MQAR model's shape in bf16 (head 32, values 64; 128 (sequence, head) pairs take the few-pairs
    # launch shapes; one chunk, then several), where trained GDN did not learn (docs/results.md, section 2):
    # with 32-wide keys dk was wrong and an initial state gave an illegal memory access (chunk.MIN_KEY_WIDTH)
    (64, 64, 2, 32, 64, torch.bfloat16, None, False, 1e-2),
    (64, 64, 2, 32, 64, torch.bfloat16, None, True, 1e-2),
    (64, 256, 2, 32, 64, torch.bfloat16, None, True, 1e-2),
    (32, 512, 3, 64, 128, torch.bfloat16, None, False, 1e-2),    # the 20m preset's training shape
    (2, 300, 4, 64, 128, torch.float32, None, True, 1e-4),
    (8, 100, 2, 32, 64, torch.float32, None, True, 1e-4),
    (1, 500, 4, 128, 64, torch.float32, [0, 1, 65, 200, 500], True, 1e-4),
    # whole chunks in fp32 (which never takes TMA) and packed; the bf16 cases whose T is a multiple of 64 take
    # the TMA path on a card whose CARD_LAUNCH rows ask for it (H100): few pairs above, and here packed with
    # an empty sequence (few pairs) and 48 x 3 = 144 pairs (the many-pairs rows)
    (3, 128, 2, 128, 128, torch.float32, None, True, 1e-4),
    (1, 384, 3, 64, 128, torch.float32, [0, 128, 128, 384], True, 1e-4),
    (1, 384, 3, 128, 128, torch.bfloat16, [0, 128, 128, 384], True, 1e-2),
    (48, 128, 3, 128, 128, torch.bfloat16, None, False, 1e-2),
]


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="GPU kernels, not the interpreter")
@pytest.mark.parametrize("B,T,H,K,V,dtype,cu,state,tol", GPU_CASES)
def test_triton_chunk_forward_backward_gpu(B, T, H, K, V, dtype, cu, state, tol):
    from oryx_torch.kernels.gdn.chunk import chunk_gated_delta_rule

    num_seqs = B if cu is None else len(cu) - 1
    cu_seqlens = None if cu is None else torch.tensor(cu, device="cuda")
    inputs = random_inputs(B, T, H, K, V, dtype, device="cuda", seed=6, num_seqs=num_seqs, with_state=state)
    grad_o = torch.randn(B, T, H, V, device="cuda", dtype=dtype)
    grad_final = torch.randn(num_seqs, H, K, V, device="cuda") if state else None
    o_ref, final_ref, grads_ref = _gpu_reference(inputs, cu_seqlens, grad_o, grad_final)
    leaves = [None if x is None else x.clone().requires_grad_() for x in inputs]
    o, final = chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=state,
                                      cu_seqlens=cu_seqlens)
    assert o.dtype == dtype
    assert rel_err(o, o_ref) < tol
    if state:
        assert rel_err(final, final_ref) < tol
        torch.autograd.backward([o, final], [grad_o, grad_final])
    else:
        assert final is None
        o.backward(grad_o)
    for name, x, ref in zip(("q", "k", "v", "g", "beta", "h0"), leaves, grads_ref):
        if x is not None:
            assert rel_err(x.grad, ref) < tol, name


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="GPU kernels, not the interpreter")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_fused_recurrent_and_decode_gpu(dtype, tol):
    from oryx_torch.kernels.gdn.fused_recurrent import (
        fused_recurrent_gated_delta_rule, gated_delta_rule_decode_step)

    B, T, H, K, V = 3, 40, 4, 128, 64
    q, k, v, g, beta, h0 = random_inputs(B, T, H, K, V, dtype, device="cuda", seed=7)
    o_ref, final_ref = naive_recurrent_gated_delta_rule(q.double(), k.double(), v.double(), g.double(),
                                                        beta.double(), initial_state=h0.double(),
                                                        output_final_state=True)
    o, final = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert rel_err(o, o_ref) < tol and rel_err(final, final_ref) < tol
    state = h0.clone()
    k_cache = torch.full((B, 2, T, K), float("nan"), device="cuda", dtype=dtype)
    v_cache = torch.full((B, 2, T, V), float("nan"), device="cuda", dtype=dtype)
    steps = [gated_delta_rule_decode_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state,
                                          k_cache=k_cache, v_cache=v_cache, k_append=k[:, t, :2],
                                          v_append=v[:, t, :2], cache_pos=torch.full((B,), t, device="cuda"))
             for t in range(T)]
    assert rel_err(torch.stack(steps, 1), o_ref) < tol and rel_err(state, final_ref) < tol
    assert torch.equal(k_cache, k[:, :, :2].transpose(1, 2)) and torch.equal(v_cache, v[:, :, :2].transpose(1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="GPU kernels, not the interpreter")
def test_decode_step_first_called_inside_a_cuda_graph_capture():
    # The decode step keeps its one-token cu_seqlens per batch size; one first made during a capture lives in
    # the graph's memory pool, so it must not be kept for later eager calls (B=5 is used by no other test).
    from oryx_torch.kernels.gdn import fused_recurrent
    from oryx_torch.kernels.gdn.fused_recurrent import gated_delta_rule_decode_step

    B, H, K, V = 5, 2, 64, 64
    q, k, v, g, beta, h0 = random_inputs(B, 1, H, K, V, torch.float32, device="cuda", seed=12)
    fused_recurrent._ONE_TOKEN_EACH.pop((B, q.device), None)
    q, k, v, g, beta = (x[:, 0] for x in (q, k, v, g, beta))
    state = h0.clone()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):    # compile the kernel outside the capture, at another batch size
        gated_delta_rule_decode_step(q[:1], k[:1], v[:1], g[:1], beta[:1], h0[:1].clone())
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_graph = gated_delta_rule_decode_step(q, k, v, g, beta, state)
    assert (B, q.device) not in fused_recurrent._ONE_TOKEN_EACH
    graph.replay()
    del graph
    eager_state = h0.clone()
    o_eager = gated_delta_rule_decode_step(q, k, v, g, beta, eager_state)
    assert (B, q.device) in fused_recurrent._ONE_TOKEN_EACH
    assert torch.equal(o_graph, o_eager) and torch.equal(state, eager_state)
