"""The Mamba-2 Triton kernels on CPU through the Triton interpreter (TRITON_INTERPRET=1), at tiny sizes.

TRITON_INTERPRET must be set before triton is first imported (triton.language's own jit helpers are
built then), and once set it would switch every later test of the process to the interpreter. So a
single test reruns this file in a fresh CPU-only process with the interpreter on, and the kernel
tests run only there.

Outputs are poisoned (every torch.empty in the kernel modules returns NaN) so an element the kernels
never write fails the comparison. Inputs are float32 and the kernels use input_precision="ieee" for
float32, so the tolerance is 1e-4 relative to float64 references.
"""
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

CHILD_FLAG = "ORYX_MAMBA2_INTERPRET_CHILD"
IN_PROCESS = bool(os.environ.get(CHILD_FLAG))
if IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import triton.runtime.interpreter as triton_interpreter  # noqa: E402

from oryx_torch.kernels.mamba2 import chunk, fused_recurrent, naive_recurrent_ssd  # noqa: E402
from test_mamba2_kernels import GRAD_NAMES, loss_and_grads, make_inputs, relative_error  # noqa: E402

in_process_only = pytest.mark.skipif(not IN_PROCESS, reason="runs in the subprocess of test_interpreter_suite")


@pytest.mark.skipif(IN_PROCESS, reason="the tests below run in this process")
def test_interpreter_suite_in_subprocess():
    here = pathlib.Path(__file__)
    env = {**os.environ, CHILD_FLAG: "1", "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here)],
        cwd=here.parents[2], env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # every kernel test must have run there: only the launcher itself may be skipped
    assert re.search(r"\b10 passed, 1 skipped\b", result.stdout), result.stdout[-2000:]


TOL = 1e-4


class _PoisonedTorch:
    """Stands in for the `torch` module inside the kernel modules: fresh buffers come filled with NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*shape, **kwargs):
        return torch.full(shape, float("nan"), **kwargs)

    @staticmethod
    def empty_like(x, **kwargs):
        return torch.full_like(x, float("nan"), **kwargs)


@pytest.fixture(autouse=True)
def interpreter_setup(monkeypatch):
    if not IN_PROCESS:
        return
    # Triton 3.6's interpreter turns a loop bound into an int with int(array of shape (1,)), which
    # NumPy >= 2.4 refuses; read the single element instead.
    original = triton_interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    monkeypatch.setattr(triton_interpreter, "_patch_lang_tensor", patch_lang_tensor)
    monkeypatch.setattr(chunk, "torch", _PoisonedTorch())
    # Narrow tiles, so that tiny heads still split into several key and value blocks.
    for setting in ("fwd_block_v", "bwd_block_k", "dv_block_v"):
        monkeypatch.setitem(chunk.KERNEL_SETTINGS, setting, 16)
    monkeypatch.setattr(fused_recurrent, "torch", _PoisonedTorch())


def _float32(inputs):
    return {n: (None if t is None else t.float()) for n, t in inputs.items()}


@in_process_only
@pytest.mark.parametrize(
    "B, T, H, K, V, bounds, use_D, use_h0",
    [
        (2, 37, 2, 32, 16, None, True, True),  # ragged T (3 chunks of 16), K != V
        (1, 50, 2, 16, 24, [0, 7, 7, 40, 50], False, True),  # packed sequences, one empty
        (1, 21, 1, 16, 16, [0, 21], True, False),
    ],
)
def test_triton_chunk_forward_and_backward(B, T, H, K, V, bounds, use_D, use_h0):
    cu_seqlens = None if bounds is None else torch.tensor(bounds)
    x = make_inputs(B, T, H, K, V, num_seqs=B if bounds is None else len(bounds) - 1, seed=T)
    x["D"] = x["D"] if use_D else None
    x["initial_state"] = x["initial_state"] if use_h0 else None
    (o_ref, ht_ref), g_ref = loss_and_grads(naive_recurrent_ssd, x, cu_seqlens)
    (o, ht), g = loss_and_grads(chunk.chunk_ssd, _float32(x), cu_seqlens, chunk_size=16)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32
    assert relative_error(o, o_ref) < TOL
    assert relative_error(ht, ht_ref) < TOL
    assert set(g) == set(g_ref)
    for n in g:
        assert relative_error(g[n], g_ref[n]) < TOL, n


@in_process_only
def test_triton_chunk_gradients_without_final_state():
    x = make_inputs(1, 20, 2, 16, 16, seed=3)
    leaves = {n: t.float().requires_grad_() for n, t in x.items()}
    ref_leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, ht = chunk.chunk_ssd(**leaves, chunk_size=16)
    o_ref, _ = naive_recurrent_ssd(**ref_leaves)
    assert ht is None
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (o * do.float()).sum().backward()
    (o_ref * do).sum().backward()
    for n in GRAD_NAMES:
        assert relative_error(leaves[n].grad, ref_leaves[n].grad) < TOL, n


@in_process_only
def test_triton_chunk_is_a_custom_op_under_torch_compile():
    """A compiled caller keeps one graph (the kernels are the custom ops oryx::ssd_chunk_forward/_backward)
    and matches eager in value and gradients."""
    x = _float32(make_inputs(1, 20, 2, 16, 16, seed=4))

    def loss(q, **inputs):
        o, _ = chunk.chunk_ssd(q * 0.5, **inputs, chunk_size=16)  # ops before and after the call
        return (o * o).sum()

    explained = torch._dynamo.explain(loss)(**x)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    eager_leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    compiled_leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    eager, compiled = loss(**eager_leaves), torch.compile(loss, backend="aot_eager")(**compiled_leaves)
    assert relative_error(compiled, eager) < 1e-6
    eager.backward()
    compiled.backward()
    for n in eager_leaves:
        assert relative_error(compiled_leaves[n].grad, eager_leaves[n].grad) < 1e-6, n


@in_process_only
def test_triton_chunk_rejects_bad_chunk_size_and_mixed_dtypes():
    x = _float32(make_inputs(1, 8, 1, 16, 16))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk.chunk_ssd(**x, chunk_size=24)
    with pytest.raises(ValueError, match="dtype"):
        chunk.chunk_ssd(**{**x, "q": x["q"].double()})


@in_process_only
@pytest.mark.parametrize("bounds", [None, [0, 4, 4, 19]])
def test_triton_fused_recurrent(bounds):
    cu_seqlens = None if bounds is None else torch.tensor(bounds)
    B = 2 if bounds is None else 1
    x = make_inputs(B, 19, 2, 16, 40, num_seqs=B if bounds is None else len(bounds) - 1, seed=11)
    o_ref, ht_ref = naive_recurrent_ssd(**x, output_final_state=True, cu_seqlens=cu_seqlens)
    o, ht = fused_recurrent.fused_recurrent_ssd(**_float32(x), output_final_state=True, cu_seqlens=cu_seqlens)
    assert relative_error(o, o_ref) < TOL
    assert relative_error(ht, ht_ref) < TOL


@in_process_only
def test_triton_decode_steps_update_state_and_append_cache():
    B, T, H, K, V, Hc, Dk, Dv, Tmax = 2, 6, 3, 16, 40, 2, 8, 24, 10
    x = make_inputs(B, T, H, K, V, seed=13)
    o_ref, ht_ref = naive_recurrent_ssd(**x, output_final_state=True)
    x = _float32(x)
    gen = torch.Generator().manual_seed(17)
    k_cache = torch.randn(B, Hc, Tmax, Dk, generator=gen).half()  # a cast on append
    v_cache = torch.randn(B, Hc, Tmax, Dv, generator=gen)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    start = torch.tensor([0, 3])
    state = x["initial_state"].clone()
    outputs = []
    for t in range(T):
        k_new = torch.randn(B, Hc, Dk, generator=gen)
        v_new = torch.randn(B, Hc, Dv, generator=gen)
        for b in range(B):
            expected_k[b, :, start[b] + t] = k_new[b].half()
            expected_v[b, :, start[b] + t] = v_new[b]
        outputs.append(fused_recurrent.ssd_decode_step(
            x["q"][:, t], x["k"][:, t], x["v"][:, t], x["dt"][:, t], x["A"], x["D"], state,
            k_cache=k_cache, v_cache=v_cache, k_append=k_new, v_append=v_new, cache_pos=start + t,
        ))
    assert relative_error(torch.stack(outputs, 1), o_ref) < TOL
    assert relative_error(state, ht_ref) < TOL
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@in_process_only
def test_triton_decode_rejects_bad_state():
    x = _float32(make_inputs(2, 1, 2, 16, 16))
    with pytest.raises(ValueError, match="state"):
        fused_recurrent.ssd_decode_step(
            x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], x["dt"][:, 0], x["A"], x["D"], x["initial_state"].double()
        )
