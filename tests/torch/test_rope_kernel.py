"""The fused RoPE Triton kernel (kernels/rope.py) against the float64 torch form.

On CPU the kernel runs under Triton's interpreter, which must be switched on before triton
is imported: the outer pytest process runs this file again in a subprocess with
TRITON_INTERPRET=1, where the kernel tests run (they skip in the outer process).
"""
import os
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from oryx_torch.attention import apply_rope, rope_tables  # noqa: E402
from error_metrics import relative_error as worst_relative_error  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs inside the TRITON_INTERPRET=1 subprocess")


def test_in_interpreter_subprocess():
    if INTERPRETED:
        pytest.skip("already inside the interpreter run")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
                             __file__], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"\b4 passed, 1 skipped\b", result.stdout), result.stdout[-2000:]


def inputs(B, T, H, D, dtype, device="cpu", seed=0, offset=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    cos, sin = rope_tables(D, 10000.0, torch.arange(offset, offset + T, device=device))
    grad = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, cos, sin, grad


def reference(x, cos, sin, grad):
    """Output and input gradient of the torch form in float64."""
    x64 = x.detach().double().requires_grad_()
    out = apply_rope(x64, cos.double(), sin.double())
    (out * grad.double()).sum().backward()
    return out.detach(), x64.grad


def rel(a, b):
    assert torch.isfinite(a).all()
    return worst_relative_error(a, b)


def check_fused(x, cos, sin, grad, tol):
    from oryx_torch.kernels.rope import fused_rope

    out_ref, grad_ref = reference(x, cos, sin, grad)
    leaf = x.clone().requires_grad_()
    out = fused_rope(leaf, cos, sin)
    assert out.dtype == x.dtype and out.shape == x.shape
    (out * grad).sum().backward()
    assert rel(out, out_ref) < tol
    assert rel(leaf.grad, grad_ref) < tol


@needs_interpreter
@pytest.mark.parametrize("B,T,H,D,dtype,tol", [
    (2, 5, 3, 8, torch.float32, 1e-6),   # a head count that is not a power of two (masked rows)
    (1, 7, 4, 16, torch.float16, 2e-3),  # half precision: rounded once at the end
])
def test_fused_rope_matches_float64(B, T, H, D, dtype, tol):
    check_fused(*inputs(B, T, H, D, dtype, seed=B * T, offset=100), tol)


@needs_interpreter
def test_fused_rope_rejects_mismatched_tables():
    from oryx_torch.kernels.rope import fused_rope

    x, cos, sin, _ = inputs(1, 4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="rope tables"):
        fused_rope(x, cos[:3], sin[:3])
    with pytest.raises(ValueError, match="rope tables"):
        fused_rope(x, cos.half(), sin.half())


@needs_interpreter
def test_fused_rope_on_a_strided_input():
    x, cos, sin, grad = inputs(2, 6, 2, 8, torch.float32, seed=3)
    check_fused(x.transpose(0, 1).contiguous().transpose(0, 1), cos, sin, grad, 1e-6)


@pytest.mark.gpu
def test_cuda_apply_rope_takes_the_fused_kernel_and_matches():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x, cos, sin, grad = inputs(4, 300, 6, 64, torch.bfloat16, device="cuda", seed=9)
    leaf = x.clone().requires_grad_()
    out = apply_rope(leaf, cos, sin)
    assert out.grad_fn is not None and "Rope" in type(out.grad_fn).__name__
    (out * grad).sum().backward()
    out_ref, grad_ref = reference(x, cos, sin, grad)
    assert rel(out, out_ref) < 1e-2
    assert rel(leaf.grad, grad_ref) < 1e-2
