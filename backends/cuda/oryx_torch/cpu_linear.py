"""Matrix products of CPU inference (fp32, no autograd) through oneDNN with weights reordered once.

torch's `F.linear` on the CPU calls MKL's sgemm, which reads the weight in its stored [out, in] layout on every
call. oneDNN's inner-product primitive (`torch.ops.mkldnn._linear_pointwise`, what inductor's CPU freezing emits)
reads a copy reordered once into its own blocked layout, and applies an elementwise epilogue (SiLU, a product or
a sum with another tensor) while the output tile is still in cache: fewer passes over the activations, and a
product that is faster at every row count on an AVX2 CPU.

`applies(x)` says when these run; callers fall back to `F.linear` otherwise. A reordered weight is a copy: the
modules keep them next to the concatenations they come from (`OryxMixer._fused`, `SwiGLU._fused`) and drop both
together, so a weight written behind autograd's back (fused optimizers, `.data`) never leaves a stale copy.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import torch

# Whether prefill products take this path where `applies`; tests switch it off to compare against F.linear.
ENABLED = True


@functools.cache
def available() -> bool:
    """Whether this torch has oneDNN's reordered-weight linear (x86 and aarch64 builds with mkldnn)."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2), None)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), w, None, "none", [None], "")
        return bool(torch.equal(out, torch.full((1, 2), 2.0)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def applies(x: torch.Tensor) -> bool:
    """Whether x's products may run here: fp32 on the CPU, outside autograd and torch.compile."""
    return (ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and available())


def reorder(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] in oneDNN's layout for `linear` (a copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def linear(x: torch.Tensor, packed: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """x @ W^T for W reordered by `reorder`; activation "none" or "swish" (SiLU) applied in the epilogue."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, activation, [None], "")


def linear_add(x: torch.Tensor, packed: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """other + x @ W^T, the sum taken in the product's epilogue (other has the output's shape)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, None, "add")


def linear_mul(x: torch.Tensor, packed: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """other * (x @ W^T), the product taken in the epilogue (other has the output's shape)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, None, "mul")


@functools.cache
def _mkl_thread_setter():
    """MKL's per-thread thread count setter (C interface) in torch's own library, or None where torch has no MKL."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        setter = lib.MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return None
    setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
    return setter


@contextlib.contextmanager
def mkl_one_thread():
    """MKL calls made by this thread inside the block run on one thread (other threads are unaffected).

    A batch of small triangular solves is one MKL call per matrix, each opening and closing a parallel region that
    costs more than the solve; on one thread the batch runs several times faster. A no-op without MKL."""
    setter = _mkl_thread_setter()
    if setter is None:
        yield
        return
    previous = setter(1)
    try:
        yield
    finally:
        setter(previous)
