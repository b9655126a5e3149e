"""The decode matvec kernel (oryx_torch.kernels.decode_matvec) against float64 on fresh random inputs, through
Triton's interpreter on the CPU, in every epilogue, fp32 and bf16, batch 1 and more, output rows not a multiple of
the program's block; a tiny model decoding with it (ORYX_FUSED_MATVEC) picks the greedy tokens of the fused step
without it and runs five kernels a layer; on a GPU the same.

TRITON_INTERPRET=1 must be set before triton is imported, so the outer pytest process reruns this file in a
subprocess with it set (test_in_interpreter_subprocess), where the kernel tests run.
"""
import os

import numpy as np
import pytest

from triton_interpreter import INTERPRETED, needs_interpreter, rerun_under_interpreter

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from oryx_torch import model as model_module  # noqa: E402
from test_decode_step_kernels import (GDN_CASES, MODEL_CASES, STEPS, assert_cuda_launches_match_float64,  # noqa: E402
                                      decode_tokens, gdn_args, recurrent_token_ref, tiny_model)

NORM_EPS = 1e-5
FAST_PASSED = 46  # the kernel and model tests below that run in the interpreter subprocess without --runslow


def test_in_interpreter_subprocess():
    """This file's fast tests under TRITON_INTERPRET=1; exactly these many pass there (none silently skips)."""
    rerun_under_interpreter(__file__, FAST_PASSED, pytest_args=("-m", "not gpu and not slow"))


@pytest.mark.slow
def test_in_interpreter_subprocess_slow():
    """The greedy-token comparisons of every mode and cache variant under TRITON_INTERPRET=1 (minutes)."""
    rerun_under_interpreter(__file__, len(MODEL_CASES) + 3, launcher_skips=False,
                            pytest_args=("--runslow", "-m", "not gpu", "-k", "greedy_tokens_slow"))


# ----- the kernel against float64 -----
def matvec_ref(x, weight, norm_weight, residual, silu_mul):
    """What matvec computes, in float64, rounded to x's dtype where the unfused torch step rounds and at the end."""
    dtype = x.dtype

    def rounded(t):
        if dtype == torch.bfloat16 and INTERPRETED:  # Triton's interpreter casts fp32 to bf16 by truncation
            return (t.float().view(torch.int32) & -65536).view(torch.float32).double()
        return t.to(dtype).double()

    xd = x.double()
    if norm_weight is not None:
        xd = rounded(xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + NORM_EPS) * norm_weight.double())
    y = xd @ weight.double().t()
    if silu_mul:
        gate, up = (rounded(t) for t in y.chunk(2, dim=-1))
        y = gate * torch.sigmoid(gate) * up
    elif residual is not None:
        y = rounded(y) + residual.double()
    return rounded(y)


def assert_close(name, got, want, tol):
    """Worst element (against the largest reference element) and relative norm of the difference."""
    got, want = got.double(), want.double()
    diff = (got - want).abs()
    worst = float(diff.max() / want.abs().max().clamp_min(1e-12))
    norm = float(diff.norm() / want.norm().clamp_min(1e-12))
    assert worst < tol and norm < tol, f"{name}: worst {worst:.2e}, relative norm {norm:.2e}"


EPILOGUES = {  # (norm, residual, silu_mul)
    "plain": (False, False, False),
    "norm (input projections)": (True, False, False),
    "residual add (o_proj, down)": (False, True, False),
    "norm, SiLU(gate) * up (the MLP's [gate; up])": (True, False, True),
}
SHAPES = {  # (B, K, N): N = output columns, never a multiple of the block; K not a multiple of the chunk
    "batch 1": (1, 100, 37),
    "batch 3": (3, 72, 45),
    "batch 8, K over several chunks": (8, 300, 21),
    "batch 20 (tensor-core dots), K over several chunks": (20, 300, 70),
}


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_matvec_matches_float64(epilogue, shape, dtype):
    from oryx_torch.kernels.decode_matvec import matvec

    norm, add, silu_mul = EPILOGUES[epilogue]
    B, K, N = SHAPES[shape]
    rng = torch.Generator().manual_seed(len(epilogue) * 100 + B)
    x = (2 * torch.randn(B, K, generator=rng)).to(dtype)
    weight = (torch.randn(2 * N if silu_mul else N, K, generator=rng) / K ** 0.5).to(dtype)
    norm_weight = (1 + 0.3 * torch.randn(K, generator=rng)).to(dtype) if norm else None
    residual = torch.randn(B, N, generator=rng).to(dtype) if add else None
    out = matvec(x, weight, norm_weight, NORM_EPS, residual, silu_mul)
    assert out.shape == (B, N) and out.dtype == dtype
    # bf16: one-unit flips where an fp32 sum lands next to a rounding boundary
    assert_close(epilogue, out, matvec_ref(x, weight, norm_weight, residual, silu_mul),
                 tol=1e-5 if dtype == torch.float32 else 5e-3)


@needs_interpreter
def test_matvec_reads_row_views():
    """x as a column slice of a wider tensor (row stride > K) and the weight as a row slice of a concatenation,
    as the fused step passes them."""
    from oryx_torch.kernels.decode_matvec import matvec

    rng = torch.Generator().manual_seed(11)
    wide, whole = torch.randn(2, 90, generator=rng), torch.randn(50, 64, generator=rng)
    x, weight = wide[:, 10:74], whole[7:40]
    assert torch.equal(matvec(x, weight), matvec(x.contiguous(), weight.contiguous()))
    assert_close("views", matvec(x, weight), x.double() @ weight.double().t(), tol=1e-5)


def test_matvec_refuses_too_many_rows_and_misshaped_weights():
    from oryx_torch.kernels.decode_matvec import MAX_ROWS, matvec

    with pytest.raises(ValueError, match="rows"):
        matvec(torch.zeros(MAX_ROWS + 1, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="weight"):
        matvec(torch.zeros(2, 8), torch.zeros(4, 6))


def test_blocks_spread_a_small_projection_over_the_sms():
    """At batch 1 on 132 SMs a 576-row projection runs as >= 132 programs; the product tile stays in budget."""
    from oryx_torch.kernels.decode_matvec import MAX_ROWS, _TILE, matvec_blocks

    for rows, columns, depth in ((1, 576, 576), (1, 1542, 576), (8, 576, 1536), (8, 49152, 576)):
        for gated in (False, True):
            block, chunk = matvec_blocks(rows, columns, depth, 132, gated)
            assert 4 <= block <= 32 and 32 <= chunk <= 1024
            assert rows * block * chunk <= _TILE // (2 if gated else 1) or chunk == 32
            if columns <= 1542:
                assert -(-columns // block) >= 132
    assert matvec_blocks(8, 576, 64, 132)[1] == 64  # no longer than K needs
    assert min(matvec_blocks(MAX_ROWS, 576, 1536, 132, True)) >= 16  # tensor-core dots


# ----- the recurrent token kernel with one program per query head -----
@needs_interpreter
@pytest.mark.parametrize("case", GDN_CASES)
def test_recurrent_token_step_split_heads_matches_float64(case):
    """As the per-key/value-head launch: output, every state copy, the windows (shifted once, by the last
    program of each group) and the KV cache (written once); the arrival counts are left at zero."""
    from oryx_torch.kernels.decode_step import _ARRIVALS, recurrent_token_step

    args = gdn_args(len(case), **GDN_CASES[case])
    want_out, want_windows, want_state, want_k, want_v = recurrent_token_ref(args)
    out = recurrent_token_step(**args, split_heads=True)
    assert_close("out", out, want_out, tol=2e-5)
    assert_close("state (every copy)", args["state"], want_state, tol=2e-5)
    for name, want in zip(("win_q", "win_k", "win_v"), want_windows):
        assert_close(name, args[name], want, tol=1e-7)
    if want_k is not None:
        assert_close("k_cache", args["k_cache"], want_k, tol=2e-5)
        assert_close("v_cache", args["v_cache"], want_v, tol=2e-5)
    assert not _ARRIVALS[out.device].any()


# ----- the model: with the matvec kernels the fused step picks the same tokens -----
def matvec_and_fused_tokens(case, monkeypatch):
    """(tokens with FUSED_MATVEC on, with it off, the kernels the matvec run called) on the fp32 tiny model."""
    from oryx_torch.kernels import decode_matvec, decode_step

    calls = []
    for module, names in ((decode_matvec, ("matvec",)),
                          (decode_step, ("rms_norm_rows", "add_rms_norm_rows", "silu_mul"))):
        for name in names:
            original = getattr(module, name)
            monkeypatch.setattr(module, name,
                                lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    prompt_mode, step_modes, drop = MODEL_CASES[case]
    model = tiny_model(mixer="mamba2" if case.startswith("mamba-2") else "gdn")
    monkeypatch.setattr(model_module, "FUSED_MATVEC", True)
    monkeypatch.setattr(model_module, "FUSED_MATVEC_MAX_BATCH", decode_matvec.MAX_ROWS)
    with_matvec = decode_tokens(model, True, prompt_mode, step_modes, drop)
    matvec_calls = list(calls)
    monkeypatch.setattr(model_module, "FUSED_MATVEC", False)
    without = decode_tokens(model, True, prompt_mode, step_modes, drop)
    assert calls.count("matvec") == matvec_calls.count("matvec")  # nothing of it ran while switched off
    return with_matvec, without, matvec_calls, model.cfg.n_layers


@needs_interpreter
@pytest.mark.slow
@pytest.mark.parametrize("case", MODEL_CASES)
def test_matvec_greedy_tokens_slow(case, monkeypatch):
    """Same tokens in every mode and cache variant; each layer is norm+projections, o_proj+add, norm+[gate; up]+
    activation, down+add (four matvec launches) around the token kernels, and the final norm with the LM head is
    one more."""
    with_matvec, without, calls, L = matvec_and_fused_tokens(case, monkeypatch)
    np.testing.assert_array_equal(with_matvec, without)
    assert len(set(without.ravel().tolist())) > 3  # the comparison can tell tokens apart
    steps = STEPS - 1
    assert calls.count("matvec") == (4 * L + 1) * steps
    assert calls.count("rms_norm_rows") == calls.count("add_rms_norm_rows") == calls.count("silu_mul") == 0


@needs_interpreter
@pytest.mark.slow
@pytest.mark.parametrize("case", ["mixed rows", "recurrent", "mamba-2, mixed rows"])
def test_split_heads_greedy_tokens_slow(case, monkeypatch):
    """The fused step with the recurrent token kernel split by query head (and the matvec kernels) picks the
    tokens of the fused step without either, and the split launch is what ran."""
    from oryx_torch.kernels import decode_step

    splits = []
    original = decode_step.recurrent_token_step
    monkeypatch.setattr(decode_step, "recurrent_token_step",
                        lambda *a, **k: splits.append(k.get("split_heads")) or original(*a, **k))
    prompt_mode, step_modes, drop = MODEL_CASES[case]
    model = tiny_model(mixer="mamba2" if case.startswith("mamba-2") else "gdn")
    monkeypatch.setattr(model_module, "FUSED_MATVEC", True)
    monkeypatch.setattr(model_module, "FUSED_MATVEC_MAX_BATCH", 32)
    monkeypatch.setattr(model_module, "FUSED_SPLIT_HEADS", True)
    split = decode_tokens(model, True, prompt_mode, step_modes, drop)
    assert splits and all(splits)
    monkeypatch.setattr(model_module, "FUSED_MATVEC", False)
    monkeypatch.setattr(model_module, "FUSED_SPLIT_HEADS", False)
    np.testing.assert_array_equal(split, decode_tokens(model, True, prompt_mode, step_modes, drop))
    assert not any(splits[len(splits) // 2:])


def test_fused_matvec_is_on_by_default_and_only_for_small_batches(monkeypatch):
    from oryx_torch.kernels.decode_matvec import MAX_ROWS

    assert model_module.FUSED_MATVEC == (os.environ.get("ORYX_FUSED_MATVEC", "1") == "1")
    assert model_module.FUSED_SPLIT_HEADS == (os.environ.get("ORYX_FUSED_SPLIT_HEADS", "1") == "1")
    monkeypatch.setattr(model_module, "FUSED_MATVEC", True)
    with torch.no_grad():
        assert model_module.fused_matvec_applies(torch.zeros(1, 8)) == INTERPRETED
        assert not model_module.fused_matvec_applies(torch.zeros(model_module.FUSED_MATVEC_MAX_BATCH + 1, 8))
        monkeypatch.setattr(model_module, "FUSED_MATVEC_MAX_BATCH", MAX_ROWS + 1)
        assert model_module.fused_matvec_applies(torch.zeros(MAX_ROWS, 8)) == INTERPRETED
        assert not model_module.fused_matvec_applies(torch.zeros(MAX_ROWS + 1, 8))  # past the kernel's rows
    assert not model_module.fused_matvec_applies(torch.zeros(1, 8))  # autograd on


# ----- on a GPU -----
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("B", [1, 5, 8, 20, 32])
def test_matvec_matches_float64_cuda(epilogue, dtype, B):
    """The SmolLM2-135M shapes: K 576 and 1536, N 576 and 1536."""
    from oryx_torch.kernels.decode_matvec import matvec

    norm, add, silu_mul = EPILOGUES[epilogue]
    for K, N in ((576, 1542), (1536, 576), (576, 1536)):
        rng = torch.Generator().manual_seed(K + N + B)
        x = (2 * torch.randn(B, K, generator=rng)).to(dtype)
        weight = (torch.randn(2 * N if silu_mul else N, K, generator=rng) / K ** 0.5).to(dtype)
        norm_weight = (1 + 0.3 * torch.randn(K, generator=rng)).to(dtype) if norm else None
        residual = torch.randn(B, N, generator=rng).to(dtype) if add else None
        args = [t if t is None else t.cuda() for t in (x, weight, norm_weight)]
        out = matvec(*args, NORM_EPS, None if residual is None else residual.cuda(), silu_mul).cpu()
        assert_close(f"{epilogue} K {K} N {N}", out, matvec_ref(x, weight, norm_weight, residual, silu_mul),
                     tol=1e-5 if dtype == torch.float32 else 5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("launch_pdl", [False, True], ids=["stream_order", "pdl"])
@pytest.mark.parametrize("split", [False, True], ids=["matvec", "matvec_split_heads"])
@pytest.mark.parametrize("case", ["mixed rows", "recurrent", "attention", "mamba-2, mixed rows"])
def test_matvec_greedy_tokens_equal_fused_cuda_graphs(case, split, launch_pdl, monkeypatch):
    """Under CUDA graphs, with and without programmatic dependent launch (kernels/pdl.py; where the card has none
    both runs take stream order), the tokens of the fused step without the matvec kernels, run eagerly without
    PDL."""
    from oryx_torch.kernels import pdl

    prompt_mode, step_modes, drop = MODEL_CASES[case]
    model = tiny_model("cuda", mixer="mamba2" if case.startswith("mamba-2") else "gdn")
    monkeypatch.setattr(model_module, "FUSED_MATVEC_MAX_BATCH", 32)
    monkeypatch.setattr(model_module, "FUSED_MATVEC", True)
    monkeypatch.setattr(model_module, "FUSED_SPLIT_HEADS", split)
    monkeypatch.setattr(pdl, "ENABLED", launch_pdl)
    with_matvec = decode_tokens(model, True, prompt_mode, step_modes, drop)
    monkeypatch.setattr(model_module, "FUSED_MATVEC", False)
    monkeypatch.setattr(model_module, "FUSED_SPLIT_HEADS", False)
    monkeypatch.setattr(pdl, "ENABLED", False)
    without = decode_tokens(model, True, prompt_mode, step_modes, drop, cuda_graphs=False)
    np.testing.assert_array_equal(with_matvec, without)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["design block", "mixed rows take the attention readout",
                                  "no rope, one kv head, width 2", "mamba-2, mixed rows, conv bias, no KV cache"])
def test_recurrent_token_step_split_heads_matches_float64_cuda(case):
    """On the GPU the programs of a group run at once: ten fresh launches, each against float64 (windows
    included: a window shifted before a program of its group read it shows here)."""
    assert_cuda_launches_match_float64(GDN_CASES[case], 10, split_heads=True)


@pytest.mark.gpu
def test_pdl_chain_equals_stream_order_cuda(monkeypatch):
    """A chain of 240 dependent matvec launches (each reads the one before as its input and as its residual,
    the MLP's pair among them) captured in a CUDA graph with programmatic dependent launch gives, on every replay,
    the bits of the same launches in plain stream order: a kernel that read its input before its predecessor had
    written it would show here."""
    from oryx_torch.kernels import pdl
    from oryx_torch.kernels.decode_matvec import matvec

    if not pdl.applies(torch.device("cuda")):
        pytest.skip("this card has no programmatic dependent launch")
    K, F = 576, 1536
    rng = torch.Generator().manual_seed(0)
    square = [(torch.randn(K, K, generator=rng) / K ** 0.5).to(torch.bfloat16).cuda() for _ in range(4)]
    gate_up = (torch.randn(2 * F, K, generator=rng) / K ** 0.5).to(torch.bfloat16).cuda()
    down = (torch.randn(K, F, generator=rng) / F ** 0.5).to(torch.bfloat16).cuda()
    norm_weight = (1 + 0.1 * torch.randn(K, generator=rng)).to(torch.bfloat16).cuda()
    x0 = torch.randn(1, K, generator=rng).to(torch.bfloat16).cuda()

    def chain(x):
        for i in range(80):
            x = matvec(x, square[i % 4], norm_weight, NORM_EPS, residual=x)
            hidden = matvec(x, gate_up, norm_weight, NORM_EPS, silu_mul=True)
            x = matvec(hidden, down, residual=x)
        return x

    monkeypatch.setattr(pdl, "ENABLED", False)
    with torch.no_grad():
        want = chain(x0)
        monkeypatch.setattr(pdl, "ENABLED", True)
        static = x0.clone()
        chain(static)  # compiles the PDL launches outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = chain(static)
        for _ in range(5):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(got, want)
    assert torch.isfinite(want.float()).all() and want.float().abs().max() > 0


def test_pdl_applies_only_to_cuda_launches_outside_the_interpreter(monkeypatch):
    """Programmatic dependent launch is on by default (ORYX_PDL), never for CPU tensors or under Triton's
    interpreter (which has no such launch), and off everywhere when switched off."""
    from oryx_torch.kernels import pdl

    assert pdl.ENABLED == (os.environ.get("ORYX_PDL", "1") == "1")
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert not pdl.applies(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.applies(torch.device("cuda", 0))  # decided before asking the card
    monkeypatch.delenv("TRITON_INTERPRET")
    if torch.cuda.is_available():
        assert pdl.applies(torch.device("cuda")) == (torch.cuda.get_device_capability()[0] >= 9)
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.applies(torch.device("cuda", 0))
