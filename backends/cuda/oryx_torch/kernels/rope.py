"""Rotate-half RoPE as one Triton kernel per direction (forward and backward).

The torch form (attention.apply_rope) costs four element-wise launches each way, with fp32
intermediates of the full [B, T, H, d] tensor; here each element is read once and written
once. With x = [x1, x2] and, per position, c = cos, s = sin of the angles:
    out = [x1 c - x2 s, x2 c + x1 s]        (forward, sign = +1)
    dx  = [g1 c + g2 s, g2 c - g1 s]        (backward: the same rotation with s -> -s)
The math runs in fp32 and rounds once to x's dtype, as the torch form does.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x, cos, sin, out, T, H, D: tl.constexpr, HALF: tl.constexpr, BH: tl.constexpr,
                 SIGN: tl.constexpr):
    # one program per token (b, t): all its heads at once
    token = tl.program_id(0)
    t = token % T
    heads = tl.arange(0, BH)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    mask = heads < H
    first = token.to(tl.int64) * H * D + heads * D + cols
    x1 = tl.load(x + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + first + HALF, mask=mask, other=0.0).to(tl.float32)
    # the tables are rope_tables' [c, c] and [-s, s]: the second halves hold c and s
    c = tl.load(cos + t * D + HALF + cols)
    s = tl.load(sin + t * D + HALF + cols) * SIGN
    tl.store(out + first, (x1 * c - x2 * s).to(out.dtype.element_ty), mask=mask)
    tl.store(out + first + HALF, (x2 * c + x1 * s).to(out.dtype.element_ty), mask=mask)


def _rotate(x, cos, sin, sign):
    B, T, H, D = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    _rope_kernel[(B * T,)](x, cos, sin, out, T, H, D, D // 2, triton.next_power_of_2(H), sign)
    return out


# A torch custom op (fake implementation and autograd registered), so a compiled graph can call it without
# breaking; the backward is the same op with the rotation reversed.
@torch.library.custom_op("oryx::rope", mutates_args=())
def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x [B, T, H, d] rotated by the tables [T, d]: sign +1 is RoPE, -1 its inverse (the backward)."""
    return _rotate(x, cos, sin, sign)


@rope_rotate.register_fake
def _(x, cos, sin, sign):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rope_setup_context(ctx, inputs, output):
    _, cos, sin, sign = inputs
    ctx.sign = sign
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    return rope_rotate(grad.contiguous(), cos, sin, -ctx.sign), None, None, None


rope_rotate.register_autograd(_rope_backward, setup_context=_rope_setup_context)


def fused_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of x [B, T, H, d] with fp32 tables [T, d] (attention.rope_tables); differentiable in x."""
    B, T, H, D = x.shape
    if cos.shape != (T, D) or sin.shape != (T, D) or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"rope tables must be fp32 [T, d] = {[T, D]}, got cos {list(cos.shape)} {cos.dtype}, "
                         f"sin {list(sin.shape)} {sin.dtype}")
    if D % 2 or D & (D - 1):
        raise ValueError(f"fused_rope needs a head size that is a power of two, got {D}")
    return rope_rotate(x, cos.contiguous(), sin.contiguous(), 1.0)
