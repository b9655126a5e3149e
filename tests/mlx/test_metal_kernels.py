"""Recurrence kernels of the MLX backend against a float64 NumPy reference.

The Metal kernels run in the MSL emulator (tests/msl_emulator): MLX's own generated
source compiled with g++, every GPU thread a fiber, threadgroups in random order,
outputs poisoned with NaN. Tolerances (relative L2 error): float32 inputs 1e-4;
float16 / bfloat16 inputs are compared with the reference on the same rounded
inputs, so only output rounding remains: 2e-3 (fp16), 1e-2 (bf16), state 1e-4.
"""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import msl_emulator  # noqa: E402  (tests/ is on pytest's pythonpath)

from oryx_mlx import kernels  # noqa: E402
from oryx_mlx.kernels import chunked_metal, fallback, recurrent_metal  # noqa: E402
from oryx_mlx.kernels._inputs import gated_delta_inputs, ssd_inputs  # noqa: E402
from oryx_mlx.kernels._launch import KernelLaunch, MetalKernel  # noqa: E402
from oryx_mlx.kernels.metal import can_chunk, run_metal  # noqa: E402
from error_metrics import relative_error as worst_relative_error  # noqa: E402

OUT_TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}
STATE_TOLERANCE = 1e-4
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


# ------------------------------------------------------------------ reference
def _f64(x):
    return np.array(x.astype(mx.float32)).astype(np.float64)


def reference_gated_delta(q, k, v, g, beta, state, scale):
    """S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = scale S_t^T q_t."""
    q, k, v, g, beta, S = map(_f64, (q, k, v, g, beta, state))
    out = np.zeros(v.shape)
    eye = np.eye(k.shape[-1])
    for t in range(q.shape[1]):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        transition = np.exp(g[:, t, :, None, None]) * (eye - bt * kt[..., :, None] * kt[..., None, :])
        S = transition @ S + bt * kt[..., :, None] * v[:, t, :, None, :]
        out[:, t] = scale * np.einsum("bhkv,bhk->bhv", S, q[:, t])
    return out, S


def reference_ssd(q, k, v, dt, A, D, state):
    """S_t = exp(A_h dt_t) S_{t-1} + dt_t k_t v_t^T, o_t = S_t^T q_t + D_h v_t."""
    q, k, v, dt, A, D, S = map(_f64, (q, k, v, dt, A, D, state))
    out = np.zeros(v.shape)
    for t in range(q.shape[1]):
        S = np.exp(A[:, None, None] * dt[:, t, :, None, None]) * S
        S = S + dt[:, t, :, None, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = np.einsum("bhkv,bhk->bhv", S, q[:, t]) + D[:, None] * v[:, t]
    return out, S


# ------------------------------------------------------------------ inputs
@dataclasses.dataclass
class Case:
    mixer: str  # "gdn" | "ssd"
    args: dict
    dtype: str

    def recurrence(self):
        return (gated_delta_inputs if self.mixer == "gdn" else ssd_inputs)(**self.args)

    def reference(self):
        if self.mixer == "gdn":
            return reference_gated_delta(**self.args)
        return reference_ssd(**self.args)


def make_case(mixer, B, T, H, K, V, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    cast = DTYPES[dtype]

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    state = mx.array(normal(B, H, K, V))
    v = mx.array(normal(B, T, H, V)).astype(cast)
    if mixer == "gdn":
        args = dict(
            q=mx.array(unit(normal(B, T, H, K))).astype(cast),
            k=mx.array(unit(normal(B, T, H, K))).astype(cast),
            v=v,
            g=mx.array(-rng.uniform(0.0, 0.3, (B, T, H)).astype(np.float32)),
            beta=mx.array(rng.uniform(0.1, 1.0, (B, T, H)).astype(np.float32)),
            state=state,
            scale=K**-0.5,
        )
    else:
        args = dict(
            q=mx.array(normal(B, T, H, K) / np.sqrt(K)).astype(cast),
            k=mx.array(normal(B, T, H, K) / np.sqrt(K)).astype(cast),
            v=v,
            dt=mx.array(rng.uniform(0.05, 0.5, (B, T, H)).astype(np.float32)),
            A=mx.array(-rng.uniform(0.5, 2.0, (H,)).astype(np.float32)),
            D=mx.array(normal(H)),
            state=state,
        )
    return Case(mixer, args, dtype)


def relative_error(actual, expected):
    actual = _f64(actual)
    assert not np.isnan(actual).any(), "NaN in output: an element was never written"
    return worst_relative_error(actual, expected)


def assert_matches(case, out, state):
    ref_out, ref_state = case.reference()
    v = case.args["v"]
    assert out.shape == v.shape and out.dtype == v.dtype
    assert state.shape == ref_state.shape and state.dtype == mx.float32
    assert relative_error(out, ref_out) <= OUT_TOLERANCE[case.dtype]
    assert relative_error(state, ref_state) <= STATE_TOLERANCE


# ------------------------------------------------------------------ emulated Metal
@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    if not msl_emulator.available():
        pytest.skip("the MSL emulator needs g++ and nm")
    return msl_emulator.MslEmulator(cache_dir=tmp_path_factory.mktemp("msl_emulator"), seed=1234)


# (mixer, B, T, H, K, V, dtype): odd H, K != V, K not a multiple of 32, T = 1 (decode)
TOKEN_LOOP_CASES = [
    ("gdn", 1, 5, 3, 16, 24, "float32"),
    ("gdn", 2, 3, 1, 40, 16, "float32"),
    ("gdn", 1, 1, 2, 128, 32, "float32"),
    ("gdn", 1, 6, 2, 16, 24, "float16"),
    ("gdn", 1, 6, 2, 16, 24, "bfloat16"),
    ("ssd", 1, 7, 3, 24, 16, "float32"),
    ("ssd", 1, 1, 2, 64, 128, "float32"),
    ("ssd", 1, 6, 2, 24, 16, "bfloat16"),
]

# T not a multiple of the chunk (32), several chunks, odd H, K != V
CHUNKED_CASES = [
    ("gdn", 1, 45, 3, 16, 24, "float32"),
    ("gdn", 2, 70, 1, 32, 16, "float32"),
    ("gdn", 1, 40, 1, 128, 128, "float32"),
    ("gdn", 1, 33, 2, 16, 24, "bfloat16"),
    ("ssd", 1, 45, 3, 16, 24, "float32"),
    ("ssd", 1, 37, 1, 32, 8, "float16"),
]


@pytest.mark.parametrize("spec", TOKEN_LOOP_CASES, ids=str)
def test_token_loop_kernel_in_emulator(emulator, spec):
    case = make_case(*spec)
    out, state = run_metal(case.recurrence(), chunked=False, launcher=emulator)
    assert_matches(case, out, state)


@pytest.mark.parametrize("spec", CHUNKED_CASES, ids=str)
def test_chunked_kernels_in_emulator(emulator, spec):
    case = make_case(*spec)
    launches_before = len(emulator.launches)
    out, state = run_metal(case.recurrence(), chunked=True, launcher=emulator)
    names = [name for name, _ in emulator.launches[launches_before:]]
    assert names == [chunked_metal.PREPARE_KERNEL.name, chunked_metal.SCAN_KERNEL.name]
    assert_matches(case, out, state)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_metal_kernels_on_random_shapes(emulator, seed):
    rng = np.random.default_rng(seed)
    mixer = ("gdn", "ssd")[seed % 2]
    dk, dv = (int(d) for d in rng.choice([16, 20, 24, 40, 64, 128], size=2))
    spec = (mixer, int(rng.integers(1, 3)), int(rng.integers(1, 100)), int(rng.integers(1, 4)), dk, dv,
            str(rng.choice(list(DTYPES))))
    case = make_case(*spec, seed=seed)
    for chunked in (False, True) if can_chunk(dk, dv) else (False,):
        assert_matches(case, *run_metal(case.recurrence(), chunked=chunked, launcher=emulator))


def test_emulator_compiles_mlx_generated_source(emulator):
    """What runs is MLX's full generated kernel (its signature and our body)."""
    case = make_case("gdn", 1, 2, 1, 16, 8)
    launch = recurrent_metal.recurrent_launch(*case.recurrence().args, delta_rule=True)
    source = msl_emulator.capture_source(launch)
    assert "[[kernel]] void custom_kernel_oryx_linear_recurrence" in source
    assert "[[thread_position_in_grid]]" in source
    assert recurrent_metal.RECURRENT_KERNEL.source.strip() in source


def _with_source(launch, old, new):
    assert old in launch.kernel.source
    kernel = dataclasses.replace(launch.kernel, name=launch.kernel.name + "_planted",
                                 source=launch.kernel.source.replace(old, new))
    return dataclasses.replace(launch, kernel=kernel)


def test_emulator_catches_a_skipped_write(emulator):
    case = make_case("gdn", 1, 4, 1, 16, 8)
    launch = recurrent_metal.recurrent_launch(*case.recurrence().args, delta_rule=True)
    planted = _with_source(launch, "if (lane == 0) {", "if (lane == 0 && t != 2) {")
    out, _ = emulator(planted)
    missing = np.isnan(np.array(out)).any(axis=(0, 2, 3))
    assert missing.tolist() == [False, False, True, False]


def test_emulator_catches_a_missing_barrier(emulator):
    """Without the barrier after R = U + W S, the O tiles read R tiles that other
    simdgroups have not written yet; the emulator's greedy schedule (drawn for about
    half of the 6 threadgroups) exposes it."""
    case = make_case("gdn", 2, 96, 3, 16, 16, seed=3)
    r = case.recurrence()
    prepared = emulator(chunked_metal.prepare_launch(r.q, r.k, r.v, r.log_decay, r.strength, r.out_scale, True))
    launch = chunked_metal.scan_launch(prepared, r.v, r.skip, r.state, True)
    barrier_after_resid = "        }\n        threadgroup_barrier(mem_flags::mem_threadgroup);\n\n        // O = Qd S + P R"
    assert_matches(case, *emulator(launch))
    broken_out, _ = emulator(_with_source(launch, barrier_after_resid, "        }\n\n        // O = Qd S + P R"))
    # early reads see poison (NaN) or the previous chunk's R
    assert np.isnan(_f64(broken_out)).any() or relative_error(broken_out, case.reference()[0]) > 1e-3


# ------------------------------------------------------------------ pure-MLX fallbacks
FALLBACK_CASES = [
    ("gdn", 2, 1, 3, 16, 24, "float32"),
    ("ssd", 1, 1, 2, 16, 8, "bfloat16"),
    ("gdn", 2, 77, 3, 16, 24, "float32"),
    ("gdn", 1, 9, 1, 40, 16, "float32"),
    ("gdn", 1, 70, 2, 16, 24, "bfloat16"),
    ("ssd", 2, 77, 3, 24, 16, "float32"),
    ("ssd", 1, 70, 2, 16, 8, "float16"),
]


@pytest.mark.parametrize("form", ["tokenwise", "chunked"])
@pytest.mark.parametrize("spec", FALLBACK_CASES, ids=str)
def test_fallback(spec, form):
    case = make_case(*spec)
    run = fallback.run_tokenwise if form == "tokenwise" else fallback.run_chunked
    out, state = run(case.recurrence())
    assert_matches(case, out, state)


@pytest.mark.parametrize("mixer", ["gdn", "ssd"])
def test_public_dispatch(mixer, monkeypatch):
    case = make_case(mixer, 1, 40, 2, 16, 8, seed=5)
    function = kernels.gated_delta_recurrence if mixer == "gdn" else kernels.ssd_recurrence
    expected_impl = "metal" if mx.metal.is_available() else "mlx"
    monkeypatch.setenv(kernels.ENV_VAR, expected_impl)
    assert_matches(case, *function(**case.args))
    assert_matches(case, *function(**case.args, impl="mlx"))
    monkeypatch.setenv(kernels.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=kernels.ENV_VAR):
        function(**case.args)


@pytest.mark.skipif(not hasattr(mx.fast, "gated_delta_update"), reason="mx.fast.gated_delta_update missing")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_gated_delta_matches_reference(dtype):
    case = make_case("gdn", 2, 37, 3, 16, 24, dtype, seed=7)
    assert_matches(case, *kernels.gated_delta_recurrence(**case.args, impl="fast"))


def test_fast_falls_back_for_ssd():
    case = make_case("ssd", 1, 10, 2, 16, 8, seed=8)
    assert_matches(case, *kernels.ssd_recurrence(**case.args, impl="fast"))


def test_default_state_is_zero():
    case = make_case("gdn", 1, 12, 2, 16, 8, seed=9)
    case.args["state"] = mx.zeros_like(case.args["state"])
    out, state = kernels.gated_delta_recurrence(**{**case.args, "state": None}, impl="mlx")
    assert_matches(case, out, state)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(q=mx.zeros((1, 4, 2, 8))), "q must have shape"),
        (dict(v=mx.zeros((1, 4, 3, 8))), "v must have shape"),
        (dict(g=mx.zeros((1, 4))), "g must have shape"),
        (dict(state=mx.zeros((1, 2, 8, 8))), "state must have shape"),
        (dict(k=mx.zeros((1, 4, 2, 16), mx.int32)), "k must be float32"),
        (dict(v=mx.zeros((1, 4, 2, 8), mx.float16)), "share one dtype"),
    ],
)
def test_bad_input_is_rejected(change, message):
    args = make_case("gdn", 1, 4, 2, 16, 8).args
    with pytest.raises(ValueError, match=message):
        kernels.gated_delta_recurrence(**{**args, **change})


def test_bad_impl_is_rejected():
    args = make_case("ssd", 1, 4, 2, 16, 8).args
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.ssd_recurrence(**args, impl="cuda")


def test_emulator_rejects_a_constant_buffer_used_as_device_pointer(emulator):
    """MLX binds inputs under 8 elements as `constant`; Metal refuses to convert
    such a pointer to `device`, and so must the emulator."""
    kernel = MetalKernel("address_space_probe", ("small",), ("out",),
                         "const device float* p = small; out[0] = p[0];")
    launch = KernelLaunch(kernel, (mx.ones((4,)),), (), (1, 1, 1), (1, 1, 1), ((1,),), (mx.float32,))
    with pytest.raises(msl_emulator.EmulatorError, match="g\\+\\+ failed"):
        emulator(launch)


def test_emulator_catches_uninitialised_threadgroup_memory(emulator):
    """Threadgroup memory starts as NaN bytes: a scan that never loads the initial
    state into it yields NaN."""
    case = make_case("ssd", 1, 40, 1, 16, 16)
    r = case.recurrence()
    prepared = list(emulator(chunked_metal.prepare_launch(r.q, r.k, r.v, r.log_decay, r.strength, r.out_scale, False)))
    prepared[1] = prepared[0]
    launch = chunked_metal.scan_launch(prepared, r.v, r.skip, r.state, False)
    load = "state[e] = state_in[(size_t(head_row) * Dk + e / BV) * Dv + col0 + e % BV];"
    out, state = emulator(_with_source(launch, load, ""))
    assert np.isnan(np.array(out)).all() and np.isnan(np.array(state)).all()


def test_emulator_simd_collectives(emulator):
    """The shim's collectives on a full simdgroup and a partial one (40 threads)."""
    source = """
        const uint i = thread_position_in_grid.x;
        const float x = data[i];
        out[i * 6 + 0] = simd_sum(x);
        out[i * 6 + 1] = simd_prefix_exclusive_sum(x);
        out[i * 6 + 2] = simd_shuffle_down(x, 3);
        out[i * 6 + 3] = simd_shuffle_xor(x, 1);
        out[i * 6 + 4] = simd_broadcast(x, 5);
        out[i * 6 + 5] = simd_max(x);
    """
    kernel = MetalKernel("simd_probe", ("data",), ("out",), source)
    data = np.random.default_rng(0).standard_normal(40).astype(np.float32)
    launch = KernelLaunch(kernel, (mx.array(data),), (), (40, 1, 1), (40, 1, 1), ((40, 6),), (mx.float32,))
    (out,) = emulator(launch)
    out = np.array(out)
    for lanes in (slice(0, 32), slice(32, 40)):
        x = data[lanes]
        n = len(x)
        got = out[lanes]
        np.testing.assert_allclose(got[:, 0], np.full(n, x.sum()), rtol=1e-6)
        np.testing.assert_allclose(got[:, 1], np.concatenate([[0], np.cumsum(x)[:-1]]), rtol=1e-5, atol=1e-6)
        source_lane = np.arange(n) + 3
        defined = source_lane < n  # a source past the live lanes is undefined on the GPU
        np.testing.assert_array_equal(got[defined, 2], x[source_lane[defined]])
        np.testing.assert_array_equal(got[:, 3], x[np.arange(n) ^ 1])
        np.testing.assert_array_equal(got[:, 4], np.full(n, x[5]))
        np.testing.assert_array_equal(got[:, 5], np.full(n, x.max()))
    np.testing.assert_array_equal(out[29:32, 2], data[29:32])  # past lane 31: own value
