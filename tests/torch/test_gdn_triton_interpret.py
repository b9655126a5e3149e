"""Triton GDN kernels on CPU through Triton's interpreter, at tiny sizes.

TRITON_INTERPRET=1 must be set before triton is imported, and it changes every kernel
decorated afterwards. So the outer pytest process runs this file again in a subprocess
with the variable set (test_in_interpreter_subprocess); there the kernel tests run, and
in the outer process they skip.
"""
import pytest

from triton_interpreter import needs_interpreter, rerun_under_interpreter

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from oryx_torch.kernels.gdn import naive_recurrent_gated_delta_rule  # noqa: E402
from gdn_inputs import random_inputs  # noqa: E402
from error_metrics import relative_error as worst_relative_error  # noqa: E402


def test_in_interpreter_subprocess():
    rerun_under_interpreter(__file__, passed=18, timeout=300)


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite values (unwritten output?)"
    return worst_relative_error(out, ref)


def naive_fp64(inputs, cu_seqlens=None):
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    o, final = naive_recurrent_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True,
                                                cu_seqlens=cu_seqlens)
    return leaves, o, final


def check_triton_chunk_against_naive(B, T, H, K, V, cu, dtype, tol):
    from oryx_torch.kernels.gdn.chunk import chunk_gated_delta_rule

    num_seqs = B if cu is None else len(cu) - 1
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    inputs = random_inputs(B, T, H, K, V, dtype, seed=20, num_seqs=num_seqs)
    ref_leaves, o_ref, final_ref = naive_fp64(inputs, cu_seqlens)
    grad_o, grad_final = torch.randn_like(o_ref), torch.randn_like(final_ref)
    torch.autograd.backward([o_ref, final_ref], [grad_o, grad_final])

    leaves = [x.clone().requires_grad_() for x in inputs]
    o, final = chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True,
                                      cu_seqlens=cu_seqlens)
    assert o.dtype == dtype
    assert rel_err(o, o_ref) < tol
    assert rel_err(final, final_ref) < tol
    torch.autograd.backward([o, final], [grad_o.to(dtype), grad_final.float()])
    for name, x, ref in zip(("q", "k", "v", "g", "beta", "h0"), leaves, ref_leaves):
        assert rel_err(x.grad, ref.grad) < tol, name


@needs_interpreter
@pytest.mark.parametrize("B,T,H,K,V,cu,dtype,tol", [
    (2, 70, 2, 16, 32, None, torch.float32, 1e-4),               # T not a multiple of the chunk, K != V
    (1, 69, 2, 32, 16, [0, 3, 3, 67, 69], torch.float32, 1e-4),  # packed, an empty sequence, chunk boundaries inside
    (1, 66, 1, 128, 128, None, torch.float32, 1e-4),             # several key and value blocks per chunk
    # half precision: X, A, W, dW and the states are rounded to the input dtype. (bf16 can't
    # run here: the interpreter's bf16 dots return garbage, for the old kernels too.)
    (1, 130, 2, 64, 32, None, torch.float16, 2e-3),
])
def test_triton_chunk_forward_backward(B, T, H, K, V, cu, dtype, tol):
    check_triton_chunk_against_naive(B, T, H, K, V, cu, dtype, tol)


# Every launch shape bench_gdn.py --sweep may pick must be exact, not just the defaults.
SWEPT_SHAPES = [
    {"wy_fwd": dict(BK=32, BV=32, DIAG=32, num_warps=4, num_stages=1)},
    {"wy_fwd": dict(BK=64, BV=64, DIAG=64, num_warps=4, num_stages=1),
     "state_fwd": dict(BV=32, num_warps=4, num_stages=1), "state_bwd": dict(BV=32, num_warps=4, num_stages=1)},
    {"chunk_bwd": dict(BK=32, BV=32, num_warps=4, num_stages=1)},
]


@needs_interpreter
@pytest.mark.parametrize("shapes", SWEPT_SHAPES)
def test_triton_chunk_other_launch_shapes(shapes, monkeypatch):
    from oryx_torch.kernels.gdn import chunk

    for kernel, launch in shapes.items():
        monkeypatch.setitem(chunk.LAUNCH, kernel, launch)
    check_triton_chunk_against_naive(1, 70, 1, 64, 64, [0, 5, 70], torch.float32, 1e-4)


def ask_for_tma_with_narrow_blocks(chunk, monkeypatch):
    """Every kernel's launch row asks for TMA (as CARD_LAUNCH's H100 rows do), with 32-wide blocks so that
    64-wide heads span two key and two value blocks and the tiles' offsets matter."""
    for kernel, row in chunk.LAUNCH.items():
        narrow = {key: min(value, 32) for key, value in row.items() if key in ("BK", "BV")}
        monkeypatch.setitem(chunk.LAUNCH, kernel, dict(row, **narrow, TMA=True))


@needs_interpreter
@pytest.mark.parametrize("B,T,cu,tma", [
    (2, 128, None, True),                   # every sequence whole chunks: tiles move through TMA descriptors
    (1, 320, [0, 128, 128, 320], True),     # packed, an empty sequence, still whole chunks
    (1, 130, None, False),                  # a partial chunk: the rows without TMA, masked pointer loads
])
def test_triton_chunk_tma_path(B, T, cu, tma, monkeypatch):
    """Every kernel's TMA path against the fp64 naive loop, in fp16 (fp32 never takes TMA, and the
    interpreter can't run bf16 dots); a spy records which kernel launches got descriptors."""
    from oryx_torch.kernels.gdn import chunk

    ask_for_tma_with_narrow_blocks(chunk, monkeypatch)
    launches = []
    real_launch, real_descriptor = chunk._launch, chunk.TensorDescriptor

    def spy_launch(kernel, *args, **kwargs):
        launches.append([kernel, False])
        return real_launch(kernel, *args, **kwargs)

    def spy_descriptor(*args, **kwargs):
        launches[-1][1] = True
        return real_descriptor(*args, **kwargs)

    monkeypatch.setattr(chunk, "_launch", spy_launch)
    monkeypatch.setattr(chunk, "TensorDescriptor", spy_descriptor)
    check_triton_chunk_against_naive(B, T, 3, 64, 64, cu, torch.float16, 2e-3)
    assert launches == [[name, tma] for name in ("wy_fwd", "state_fwd", "state_bwd", "chunk_bwd")]


@needs_interpreter
@pytest.mark.parametrize("B,cu", [(2, None), (1, [0, 0])])
def test_triton_chunk_with_no_tokens_where_rows_ask_for_tma(B, cu, monkeypatch):
    """No tokens count as whole chunks, but a TMA descriptor can't have zero rows: the pointer path runs,
    and the final state is the initial one."""
    from oryx_torch.kernels.gdn import chunk

    ask_for_tma_with_narrow_blocks(chunk, monkeypatch)
    num_seqs = B if cu is None else len(cu) - 1
    inputs = random_inputs(B, 0, 2, 64, 64, torch.float16, seed=22, num_seqs=num_seqs)
    leaves = [x.clone().requires_grad_() for x in inputs]
    o, final = chunk.chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True,
                                            cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32))
    assert o.shape == (B, 0, 2, 64) and torch.equal(final, inputs[5])
    final.sum().backward()
    assert torch.equal(leaves[5].grad, torch.ones_like(inputs[5]))


@needs_interpreter
def test_triton_chunk_without_state_or_grad_and_dispatcher():
    from oryx_torch.kernels.gdn import gated_delta_rule

    q, k, v, g, beta, _ = random_inputs(1, 20, 2, 16, 16, torch.float32, seed=21, with_state=False)
    o_ref, _ = naive_recurrent_gated_delta_rule(q.double(), k.double(), v.double(), g.double(), beta.double())
    with torch.no_grad():
        o, final = gated_delta_rule(q, k, v, g, beta)          # auto -> Triton under the interpreter
    assert final is None
    assert rel_err(o, o_ref) < 1e-4


@needs_interpreter
def test_triton_chunk_is_a_custom_op_under_torch_compile():
    """A compiled caller keeps one graph: the kernels are custom ops (oryx::gdn_chunk_forward/_backward),
    called from the graph without being traced into, and give the same values and gradients as eager."""
    from oryx_torch.kernels.gdn.chunk import chunk_gated_delta_rule

    inputs = random_inputs(1, 70, 2, 16, 32, torch.float32, seed=31, with_state=False)

    def loss(q, k, v, g, beta):
        o, _ = chunk_gated_delta_rule(q, k, v, g.float(), beta.float())
        return (o * o).sum()

    explained = torch._dynamo.explain(loss)(*inputs[:5])
    assert explained.graph_break_count == 0, explained.break_reasons
    eager_leaves = [x.clone().requires_grad_() for x in inputs[:5]]
    compiled_leaves = [x.clone().requires_grad_() for x in inputs[:5]]
    torch._dynamo.reset()
    eager, compiled = loss(*eager_leaves), torch.compile(loss, backend="eager")(*compiled_leaves)
    assert rel_err(compiled, eager) < 1e-6
    eager.backward()
    compiled.backward()
    for name, a, b in zip("q k v g beta".split(), compiled_leaves, eager_leaves):
        assert rel_err(a.grad, b.grad) < 1e-6, name


@needs_interpreter
@pytest.mark.parametrize("use_qk_l2norm", [False, True])
def test_fused_recurrent(use_qk_l2norm):
    from oryx_torch.kernels.gdn.fused_recurrent import fused_recurrent_gated_delta_rule

    inputs = random_inputs(1, 23, 2, 16, 32, torch.float32, seed=22, num_seqs=3)
    q, k, v, g, beta, h0 = inputs
    if use_qk_l2norm:
        q, k = 3.0 * q, 2.0 * k
    cu_seqlens = torch.tensor([0, 4, 4, 23], dtype=torch.int32)
    norm = lambda x: x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    q_ref, k_ref = (norm(q), norm(k)) if use_qk_l2norm else (q, k)
    _, o_ref, final_ref = naive_fp64((q_ref, k_ref, v, g, beta, h0), cu_seqlens)
    o, final = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                use_qk_l2norm=use_qk_l2norm, cu_seqlens=cu_seqlens)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(final, final_ref) < 1e-5


@needs_interpreter
def test_decode_steps_with_kv_append_match_the_sequence():
    from oryx_torch.kernels.gdn.fused_recurrent import gated_delta_rule_decode_step

    B, T, H, K, V = 2, 6, 2, 16, 32
    q, k, v, g, beta, h0 = random_inputs(B, T, H, K, V, torch.float32, seed=23)
    _, o_ref, final_ref = naive_fp64((q, k, v, g, beta, h0))
    state = h0.clone()
    k_cache = torch.full((B, 1, T + 2, 8), float("nan"))
    v_cache = torch.full((B, 1, T + 2, 24), float("nan"))
    key_rows, value_rows = torch.randn(B, T, 1, 8), torch.randn(B, T, 1, 24)
    outs = []
    for t in range(T):
        pos = torch.tensor([t, t + 2])                              # each sequence its own position
        outs.append(gated_delta_rule_decode_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state,
                                                 k_cache=k_cache, v_cache=v_cache, k_append=key_rows[:, t],
                                                 v_append=value_rows[:, t], cache_pos=pos))
    assert rel_err(torch.stack(outs, 1), o_ref) < 1e-5
    assert rel_err(state, final_ref) < 1e-5
    assert torch.equal(k_cache[0, 0, :T], key_rows[0, :, 0]) and torch.equal(k_cache[1, 0, 2:], key_rows[1, :, 0])
    assert torch.equal(v_cache[0, 0, :T], value_rows[0, :, 0]) and torch.equal(v_cache[1, 0, 2:], value_rows[1, :, 0])
    assert torch.isnan(k_cache[0, 0, T:]).all() and torch.isnan(k_cache[1, 0, :2]).all()


@needs_interpreter
def test_bad_arguments_raise():
    from oryx_torch.kernels.gdn.chunk import chunk_gated_delta_rule
    from oryx_torch.kernels.gdn.fused_recurrent import gated_delta_rule_decode_step

    q, k, v, g, beta, h0 = random_inputs(1, 8, 2, 24, 16, torch.float32, seed=24)
    with pytest.raises(ValueError, match="power of two"):
        chunk_gated_delta_rule(q, k, v, g, beta)
    q, k, v, g, beta, h0 = random_inputs(2, 1, 2, 16, 16, torch.float32, seed=25)
    with pytest.raises(ValueError, match="state"):
        gated_delta_rule_decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0.double())
    with pytest.raises(ValueError, match="missing"):
        gated_delta_rule_decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0,
                                     k_cache=torch.zeros(2, 1, 4, 16))
