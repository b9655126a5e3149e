"""The Triton chunk kernels as torch custom ops (oryx::gdn_chunk_forward / _backward, oryx::ssd_chunk_forward /
_backward), on CPU through Triton's interpreter: opcheck of the schema, fake (meta) implementations and autograd
registration; a torch.compile'd GDN call without graph breaks whose output and gradients equal eager and the
naive recurrence (test_mamba2_triton_interpret.py has Mamba-2's); the same opcheck of the RoPE kernel (oryx::rope) and of
the decode steps, which write the state and the KV cache in place (oryx::gdn_decode_step, oryx::ssd_decode_step).

TRITON_INTERPRET=1 must be set before triton is imported, so the outer pytest process runs this file
again in a subprocess with it set; the op tests run there and skip in the outer process.
"""
import pytest

from triton_interpreter import needs_interpreter, rerun_under_interpreter

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from gdn_inputs import random_inputs  # noqa: E402
from error_metrics import relative_error  # noqa: E402


def test_in_interpreter_subprocess():
    rerun_under_interpreter(__file__, passed=8, timeout=900)


def op_arguments(T=70, H=2, K=64, V=16, with_state=True, requires_grad=True):
    """gdn_chunk_forward's arguments for one packed sequence of T tokens (two chunks, the last partial)."""
    from oryx_torch.kernels.gdn.chunk import _packed_layout

    q, k, v, g, beta, h0 = (None if t is None else t[0] for t in random_inputs(1, T, H, K, V, seed=3,
                                                                               with_state=with_state))
    h0 = None if h0 is None else h0[None]
    cu, chunk_indices, chunk_offsets, whole = _packed_layout(1, T, None, q.device)
    leaves = [t.requires_grad_(requires_grad) for t in (q, k, v, g, beta)]
    return (*leaves, cu, chunk_indices, chunk_offsets, K ** -0.5, h0, True, requires_grad, whole)


@needs_interpreter
@pytest.mark.parametrize("with_state", [True, False])
def test_opcheck_gdn_chunk_forward(with_state):
    from oryx_torch.kernels.gdn.chunk import gdn_chunk_forward

    torch.library.opcheck(gdn_chunk_forward, op_arguments(with_state=with_state),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_interpreter
def test_compiled_call_matches_eager_and_naive():
    from oryx_torch.kernels.gdn import chunk_gated_delta_rule, naive_recurrent_gated_delta_rule

    def loss_and_grads(fn, leaves, upstream):
        o, final = fn(*leaves[:5], scale=0.3, initial_state=leaves[5], output_final_state=True)
        loss = (o * upstream).sum() + final.square().sum()
        return [o, final, *torch.autograd.grad(loss, leaves)]

    inputs = random_inputs(2, 70, 2, 16, 16, seed=4)
    upstream = torch.randn(2, 70, 2, 16, generator=torch.Generator().manual_seed(5))
    fresh = lambda dtype: [t.detach().to(dtype).requires_grad_() for t in inputs]  # noqa: E731
    torch._dynamo.reset()
    report = torch._dynamo.explain(chunk_gated_delta_rule)(*fresh(torch.float32)[:5], initial_state=inputs[5],
                                                           output_final_state=True)
    assert report.graph_break_count == 0, [b.reason for b in report.break_reasons]
    compiled = torch.compile(chunk_gated_delta_rule, backend="aot_eager", fullgraph=True)
    got = loss_and_grads(compiled, fresh(torch.float32), upstream)
    eager = loss_and_grads(chunk_gated_delta_rule, fresh(torch.float32), upstream)
    want = loss_and_grads(naive_recurrent_gated_delta_rule, fresh(torch.float64), upstream.double())
    for name, a, b, c in zip(["o", "final", "dq", "dk", "dv", "dg", "dbeta", "dh0"], got, eager, want):
        assert relative_error(a, b) < 1e-6, name
        assert relative_error(a, c) < 1e-4, name


@needs_interpreter
@pytest.mark.parametrize("with_extras", [True, False])
def test_opcheck_ssd_chunk_forward(with_extras):
    """Mamba-2 with and without D and an initial state, two chunks of 16 (the last partial)."""
    from oryx_torch.kernels.mamba2.chunk import ssd_chunk_forward

    gen = torch.Generator().manual_seed(6)
    B, T, H, K, V = 2, 24, 2, 16, 16
    q, k, v = (torch.randn(B, T, H, width, generator=gen) * 0.5 for width in (K, K, V))
    dt = torch.nn.functional.softplus(torch.randn(B, T, H, generator=gen))
    A = -torch.rand(H, generator=gen) - 0.1
    D = torch.randn(H, generator=gen) if with_extras else None
    h0 = torch.randn(B, H, K, V, generator=gen) if with_extras else None
    leaves = [t.requires_grad_() for t in (q, k, v, dt, A) + ((D, h0) if with_extras else ())]
    args = (*leaves[:5], D, h0, True, None, 16)
    torch.library.opcheck(ssd_chunk_forward, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_interpreter
def test_opcheck_rope():
    from oryx_torch.attention import rope_tables
    from oryx_torch.kernels.rope import rope_rotate

    x = torch.randn(2, 5, 3, 16, generator=torch.Generator().manual_seed(7)).requires_grad_()
    cos, sin = rope_tables(16, 10000.0, torch.arange(5))
    torch.library.opcheck(rope_rotate, (x, cos, sin, 1.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def decode_arguments(seed, K=16, V=32, B=2, H=2, capacity=6):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, K, generator=gen), torch.nn.functional.normalize(torch.randn(B, H, K, generator=gen), dim=-1)
    v = torch.randn(B, H, V, generator=gen)
    state = torch.randn(B, H, K, V, generator=gen)
    caches = [torch.zeros(B, 1, capacity, K), torch.zeros(B, 1, capacity, V)]
    appends = [torch.randn(B, 1, K, generator=gen), torch.randn(B, 1, V, generator=gen)]
    return gen, q, k, v, state, caches, appends, torch.tensor([3, 1])


@needs_interpreter
def test_opcheck_gdn_decode_step():
    from oryx_torch.kernels.gdn.fused_recurrent import gdn_decode_step

    gen, q, k, v, state, caches, appends, pos = decode_arguments(8)
    g, beta = -torch.rand(2, 2, generator=gen), torch.rand(2, 2, generator=gen)
    for cache in ((*caches, *appends, pos), (None,) * 5):
        torch.library.opcheck(gdn_decode_step, (q, k, v, g, beta, state.clone(), 0.25, True, *cache),
                              test_utils=("test_schema", "test_faketensor"))


@needs_interpreter
def test_opcheck_ssd_decode_step():
    from oryx_torch.kernels.mamba2.fused_recurrent import ssd_decode

    gen, q, k, v, state, caches, appends, pos = decode_arguments(9)
    dt, A, D = torch.rand(2, 2, generator=gen), -torch.rand(2, generator=gen), torch.randn(2, generator=gen)
    for cache in ((*caches, *appends, pos), (None,) * 5):
        torch.library.opcheck(ssd_decode, (q, k, v, dt, A, D, state.clone(), *cache),
                              test_utils=("test_schema", "test_faketensor"))
