"""The CUDA path's packed attention (attention.MIXED_ATTENTION = "packed"), run on the CPU: each sequence's
attention rows gathered to its first rows, FlexAttention under a block mask over those, the output put back.
Against float64 attention written out here (forward and gradients) and the float64 reference model.

FlexAttention refuses a backward on the CPU at its entry; its dense implementation behind that check computes
one, which the gradient tests use (`flex_backward_on_cpu`).
"""
import warnings

import numpy as np
import pytest
import torch

from oryx_core.config import preset
from oryx_torch import attention
from oryx_torch.attention import AttentionPlan, plan_attention, plan_packed_rows
from error_metrics import relative_error
from torch_models import assert_backward_tables_are_the_transpose, build


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    import torch.nn.attention.flex_attention as flex_module

    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    monkeypatch.setattr(attention, "FLEX_ON_CPU", True)
    monkeypatch.setattr(attention, "MIXED_ATTENTION", "packed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        yield


def reference_attention(q, k, v, q_offset, scale):
    """Causal grouped-query attention in float64, every row: q [B, H, T, d], k [B, Hkv, S, d], v [B, Hkv, S, dv]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = q.double() @ k.transpose(-1, -2) * scale
    T, S = q.shape[2], k.shape[2]
    causal = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + q_offset
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v


def chunk_modes(rng, B, T, chunk, share):
    return torch.from_numpy(np.repeat(rng.random((B, -(-T // chunk))) < share, chunk, axis=1)[:, :T])


def errors(got, want):
    """(worst element ÷ largest reference element, relative norm)."""
    diff = (got.double() - want.double()).abs()
    return float(diff.max() / want.abs().max()), float(diff.norm() / want.norm())


@pytest.mark.parametrize("seed, T, q_offset, chunk", [(0, 300, 0, 64), (1, 290, 0, 16), (2, 200, 37, 64),
                                                       (3, 260, 0, 1)])
def test_packed_forward_and_gradients_match_float64(flex_backward_on_cpu, seed, T, q_offset, chunk):
    """Attention rows (output, and gradients of q, k, v under an upstream gradient on those rows only) against
    float64 attention; the plans switch mode inside 128-row blocks (chunks of 64, 16 or single tokens), one
    sequence has no attention row and one only attention rows."""
    gen = torch.Generator().manual_seed(100 + seed)
    B, H, Hkv, d, dv = 4, 4, 2, 16, 32
    S = T + q_offset
    modes = chunk_modes(np.random.default_rng(seed), B, T, chunk, 0.5)
    modes[2], modes[3] = False, True
    leaves = [torch.randn(B, H, T, d, generator=gen, dtype=torch.float64),
              torch.randn(B, Hkv, S, d, generator=gen, dtype=torch.float64),
              torch.randn(B, Hkv, S, dv, generator=gen, dtype=torch.float64)]
    upstream = torch.randn(B, H, T, dv, generator=gen, dtype=torch.float64) * modes[:, None, :, None]
    outputs, grads = {}, {}
    for path in ("packed", "reference"):
        q, k, v = (t.clone().requires_grad_() for t in leaves)
        out = plan_attention(q, k, v, AttentionPlan(modes, q_offset, modes), scale=0.3) if path == "packed" else \
            reference_attention(q, k, v, q_offset, 0.3)
        (out * upstream).sum().backward()
        outputs[path], grads[path] = out, (q.grad, k.grad, v.grad)
    rows = modes[:, None, :, None].expand_as(outputs["reference"])
    worst, norm = errors(outputs["packed"][rows], outputs["reference"][rows])
    assert worst < 1e-12 and norm < 1e-12, (worst, norm)
    assert outputs["packed"][~rows].abs().max() == 0  # rows of recurrent tokens: nothing computed
    for name, got, want in zip("qkv", grads["packed"], grads["reference"]):
        worst, norm = errors(got, want)
        assert worst < 1e-12 and norm < 1e-12, (name, worst, norm)


@pytest.mark.parametrize("method", ["flex", "packed"])
@pytest.mark.parametrize("d, dv", [(32, 16), (16, 32)])
def test_unequal_head_sizes_match_float64(flex_backward_on_cpu, monkeypatch, method, d, dv):
    """Key and value heads of different sizes (padded to one size for the fused kernels, then sliced back):
    a 65-row step after one cached key, the shape of a batched prefill behind a cached token."""
    monkeypatch.setattr(attention, "MIXED_ATTENTION", method)
    gen = torch.Generator().manual_seed(11)
    B, H, Hkv, T, q_offset = 2, 4, 2, 65, 1
    modes = chunk_modes(np.random.default_rng(5), B, T, 16, 0.5)
    q = torch.randn(B, H, T, d, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, T + q_offset, d, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, T + q_offset, dv, generator=gen, dtype=torch.float64)
    out = plan_attention(q, k, v, AttentionPlan(modes, q_offset, modes), scale=0.3)
    want = reference_attention(q, k, v, q_offset, 0.3)
    assert out.shape == want.shape
    rows = modes[:, None, :, None].expand_as(want)
    worst, norm = errors(out[rows], want[rows])
    assert worst < 1e-12 and norm < 1e-12, (worst, norm)


def test_packed_blocks_are_the_needed_ones():
    """Each packed query block reads exactly the key blocks some attention row in it reaches; 'full' ones
    (no mask) only where every attention row in it sees the whole key block; the backward's per-key-block
    tables are the transpose of the forward's."""
    rng = np.random.default_rng(7)
    B, T, S, block = 3, 70, 83, 8
    modes = torch.from_numpy(rng.random((B, T)) < 0.3)
    modes[1] = False
    packed = plan_packed_rows(modes, S, q_offset=S - T, block=block)
    dense = packed.block_mask.to_dense()[:, 0].numpy()                             # [B, n_q, n_kv]
    full = np.zeros_like(dense)
    for b in range(B):
        for i in range(n := -(-T // block)):
            order = packed.order[b, i * block:(i + 1) * block].numpy()
            positions = [S - T + t for t in order if modes[b, t]]
            for j in range(-(-S // block)):
                assert bool(dense[b, i, j]) == any(p >= j * block for p in positions), (b, i, j)
                full[b, i, j] = bool(positions) and min(positions) >= min(j * block + block, S) - 1
    got_full = np.zeros_like(dense)
    counts, indices = packed.block_mask.full_kv_num_blocks[:, 0].numpy(), packed.block_mask.full_kv_indices[:, 0]
    for b, i in np.ndindex(B, n):
        got_full[b, i, indices[b, i, :counts[b, i]].numpy()] = 1
    np.testing.assert_array_equal(got_full, full)
    assert_backward_tables_are_the_transpose(packed.block_mask, block, T, S)


def test_packed_order_and_area():
    """order puts each sequence's attention rows first, in position order; inverse undoes it; the area is the
    share of causal 128-blocks computed: for the benchmark's plan (half of the 64-token chunks) below the
    unpacked mask's, which counts every 128-row block holding any attention row."""
    import bench_scripts

    rng = np.random.default_rng(3)
    modes = torch.from_numpy(rng.random((2, 50)) < 0.4)
    packed = plan_packed_rows(modes, 50)
    for b in range(2):
        rows = modes[b].nonzero().flatten()
        assert torch.equal(packed.order[b, :len(rows)], rows)
        assert torch.equal(packed.order[b][packed.inverse[b]], torch.arange(50))
    bench_model = bench_scripts.load_bench_script("bench_model")
    plan = bench_model.plan_modes("mixed", 8, 2048, "cpu")
    flex_area, packed_area = AttentionPlan(plan, 0, plan).active_area(), plan_packed_rows(plan, 2048).area
    assert flex_area == pytest.approx(0.7335, abs=1e-4) and packed_area == pytest.approx(0.5156, abs=1e-4)
    assert plan_packed_rows(torch.ones(2, 300, dtype=torch.bool), 300).area == 1.0


@pytest.mark.parametrize("mixer", ["gdn", "mamba2"])
def test_model_through_packed_attention_matches_reference(flex_backward_on_cpu, mixer):
    """A float64 model whose attention runs the packed path: logits against the float64 reference, and logits
    and every parameter's gradient against the same model through the CPU's row attention (SDPA over the
    gathered rows)."""
    cfg = preset("tiny", mixer)
    model, ref = build(cfg, seed=11)
    model = model.double()
    rng = np.random.default_rng(12)
    B, T = 2, 140
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    modes = chunk_modes(rng, B, T, 16, 0.5).numpy()
    modes[1, :] = True
    want = torch.from_numpy(ref.forward(tokens, modes)[0])
    logits, grads = {}, {}
    for flex_on_cpu in (True, False):
        attention.FLEX_ON_CPU = flex_on_cpu
        model.zero_grad(set_to_none=True)
        logits[flex_on_cpu] = model(torch.tensor(tokens), torch.tensor(modes))
        weights = torch.from_numpy(np.random.default_rng(13).standard_normal(logits[flex_on_cpu].shape))
        (logits[flex_on_cpu] * weights).sum().backward()
        grads[flex_on_cpu] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    # the model rounds its norms through fp32 (so 1e-6 from the reference); its attention runs in float64
    worst, norm = errors(logits[True].detach(), want)
    assert worst < 1e-5 and norm < 1e-5, (worst, norm)
    worst, norm = errors(logits[True].detach(), logits[False].detach())
    assert worst < 1e-12 and norm < 1e-12, (worst, norm)
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) == len(list(model.parameters()))
    for name, got in grads[True].items():
        worst, norm = errors(got, grads[False][name])
        assert worst < 1e-10 and norm < 1e-10, (name, worst, norm)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["packed", "dense"])
def test_compiled_mixed_plans_share_one_graph(flex_backward_on_cpu, method):
    """Prepared mixed plans compile into one graph (fullgraph) that later plans of the same shape reuse (packed:
    the layout and its mask are graph inputs, not constants); the compiled logits and gradients equal eager's."""
    from torch._dynamo.utils import counters

    attention.MIXED_ATTENTION = method  # the fixture restores it
    cfg = preset("tiny", "gdn")
    model, _ = build(cfg, seed=14)
    model.train()
    rng = np.random.default_rng(15)
    B, T = 2, 140
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    graphs = []
    for _ in range(3):
        tokens = torch.tensor(rng.integers(0, cfg.vocab_size, (B, T)))
        modes = chunk_modes(rng, B, T, 64, 0.5)
        modes[0, :70], modes[1, 70:] = True, False  # both modes in the batch
        tokens, plans = model.prepare(tokens, modes)
        results = []
        for forward in (compiled, model):
            logits = forward(tokens, plans)
            grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()), allow_unused=True)
            results.append((logits.detach(), grads))
        graphs.append(counters["stats"]["unique_graphs"])
        # fp32; the compiled convolution sums its taps in another order than F.conv1d
        assert relative_error(results[0][0], results[1][0]) < 1e-5
        for got, want in zip(results[0][1], results[1][1]):
            assert (got is None) == (want is None)
            if want is not None and want.abs().max() > 0:
                assert relative_error(got, want) < 1e-4
    assert graphs[0] >= 1 and graphs[1] == graphs[0] and graphs[2] == graphs[0], graphs



def check_methods_agree(device: str, backend: str):
    """A mixed plan's logits and every parameter's gradient (fp32 model on `device`) are the same through the
    packed path, FlexAttention over the rows as they are and dense SDPA; the logits are the float64
    reference's; the compiled (`backend`) packed forward equals the eager one for two plans of one shape
    without a second graph."""
    from torch._dynamo.utils import counters

    cfg = preset("tiny", "gdn").replace(head_dim=32, value_head_dim=32)
    model, ref = build(cfg, seed=16)
    model = model.to(device)
    rng = np.random.default_rng(17)
    B, T = 3, 300
    tokens = torch.from_numpy(rng.integers(0, cfg.vocab_size, (B, T)))
    modes = chunk_modes(rng, B, T, 64, 0.5)
    modes[0, :64], modes[1, :], modes[2, 64:128] = True, False, False
    want = torch.from_numpy(ref.forward(tokens.numpy(), modes.numpy())[0])
    results = {}
    for how in ("packed", "flex", "dense"):
        attention.MIXED_ATTENTION = how
        logits = model(*model.prepare(tokens, modes))
        grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()), allow_unused=True)
        results[how] = (logits.detach().cpu(), [None if g is None else g.cpu() for g in grads])
    # fp32 against float64: FlexAttention and cuDNN's convolutions may multiply in TF32
    assert relative_error(results["packed"][0], want) < 5e-3
    for other in ("flex", "dense"):
        assert relative_error(results["packed"][0], results[other][0]) < 1e-3, other
        for got, ref_grad in zip(results["packed"][1], results[other][1]):
            assert (got is None) == (ref_grad is None)
            if got is not None and ref_grad.abs().max() > 0:
                assert relative_error(got, ref_grad) < 1e-3, other
    attention.MIXED_ATTENTION = "packed"
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    graphs = []
    for seed in (18, 19):
        plan_modes = chunk_modes(np.random.default_rng(seed), B, T, 64, 0.5)
        plan_modes[0, :64], plan_modes[1, :] = True, False
        prepared = model.prepare(tokens, plan_modes)
        got = compiled(*prepared)
        assert relative_error(got.detach().cpu(), model(*prepared).detach().cpu()) < 1e-3
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0], graphs


@pytest.mark.slow
def test_methods_agree_on_cpu(flex_backward_on_cpu):
    """check_methods_agree as the CPU runs it (FlexAttention eagerly, aot_eager for the compiled forward)."""
    check_methods_agree("cpu", "aot_eager")


@pytest.mark.gpu
def test_methods_agree_on_cuda(monkeypatch):
    """check_methods_agree on CUDA, the compiled forward through inductor."""
    monkeypatch.setattr(attention, "MIXED_ATTENTION", "flex")  # restored after the test
    check_methods_agree("cuda", "inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("q_offset", [0, 45])
def test_cuda_packed_attention_matches_float64(q_offset):
    """plan_attention's packed path on CUDA (fp32, compiled FlexAttention), queries after a cache of q_offset
    keys too: the attention rows and the gradients of q, k, v against float64 attention."""
    gen = torch.Generator().manual_seed(20 + q_offset)
    B, H, Hkv, T, d, dv = 3, 6, 2, 333, 32, 64
    S = T + q_offset
    modes = chunk_modes(np.random.default_rng(q_offset), B, T, 16, 0.4)
    modes[1] = True
    leaves = [torch.randn(B, H, T, d, generator=gen), torch.randn(B, Hkv, S, d, generator=gen),
              torch.randn(B, Hkv, S, dv, generator=gen)]
    upstream = torch.randn(B, H, T, dv, generator=gen) * modes[:, None, :, None]
    results = {}
    for path in ("packed", "reference"):
        q, k, v = (t.clone().cuda().requires_grad_() if path == "packed" else t.double().requires_grad_()
                   for t in leaves)
        if path == "packed":
            plan = AttentionPlan(modes.cuda(), q_offset, modes)
            previous = attention.MIXED_ATTENTION
            attention.MIXED_ATTENTION = "packed"
            try:
                out = plan_attention(q, k, v, plan.prepare(), scale=0.3)
            finally:
                attention.MIXED_ATTENTION = previous
        else:
            out = reference_attention(q, k, v, q_offset, 0.3)
        (out * upstream.to(out)).sum().backward()
        results[path] = [t.detach().cpu() for t in (out, q.grad, k.grad, v.grad)]
    rows = modes[:, None, :, None].expand_as(results["reference"][0])
    assert relative_error(results["packed"][0][rows], results["reference"][0][rows]) < 1e-3
    for got, want in zip(results["packed"][1:], results["reference"][1:]):
        assert relative_error(got, want) < 1e-3


@pytest.mark.parametrize("method", ["flex", "packed"])
def test_flex_compile_failure_falls_back_to_rows_attention(monkeypatch, method):
    """When compiling FlexAttention fails (inductor found no kernel configuration for some small fp32 heads on an
    H100), plan_attention warns once, answers through SDPA over the attention rows (equal to float64 attention
    on those rows), and does not try FlexAttention again for those heads."""
    import torch._dynamo.exc

    calls = []

    def failing_flex(*args, **kwargs):
        calls.append(1)
        raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("NoValidChoicesError"), None)

    monkeypatch.setattr(attention, "FLEX_ON_CPU", True)
    monkeypatch.setattr(attention, "MIXED_ATTENTION", method)
    monkeypatch.setattr(attention, "flex_attention_function", lambda: failing_flex)
    monkeypatch.setattr(attention, "FLEX_FAILED", set())
    gen = torch.Generator().manual_seed(11)
    B, H, Hkv, T, d, dv = 2, 4, 2, 65, 32, 16
    q_offset = 1 if method == "flex" else 0  # "packed" applies to plans from position 0
    modes = chunk_modes(np.random.default_rng(5), B, T, 8, 0.5)
    modes[0, -1] = True
    q, k, v = (torch.randn(B, H, T, d, generator=gen), torch.randn(B, Hkv, T + q_offset, d, generator=gen),
               torch.randn(B, Hkv, T + q_offset, dv, generator=gen))
    want = reference_attention(q, k, v, q_offset, 0.2)
    with pytest.warns(RuntimeWarning, match="compiled FlexAttention failed"):
        got = plan_attention(q, k, v, AttentionPlan(modes, q_offset).prepare(), scale=0.2)
    assert got.shape == (B, H, T, dv)
    rows = modes[:, None, :, None].expand_as(got)
    worst, norm = errors(got[rows], want[rows])
    assert worst < 1e-5 and norm < 1e-5, (worst, norm)
    assert len(calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call neither warns nor tries FlexAttention again
        again = plan_attention(q, k, v, AttentionPlan(modes, q_offset).prepare(), scale=0.2)
    assert len(calls) == 1 and torch.equal(again[rows], got[rows])
