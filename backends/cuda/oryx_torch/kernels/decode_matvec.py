"""A decode token's matrix-vector products for a few rows, with the work around them fused in: one Triton kernel
per projection instead of a norm kernel, a matmul and an elementwise kernel.

    y[b] = W @ x'[b],   x'[b] = RMSNorm(x[b]) * norm_weight rounded to x's dtype   (NORM; else x' = x)

with, in the epilogue, either y + residual (o_proj and the MLP's down projection, the residual add joined to the
product) or, for the MLP's [gate; up] weight [2F, K], SiLU(gate) * up: a program computes the gate rows and the
up rows of the same block of F, so it writes the activated product directly.

Every intermediate is rounded where the unfused torch step rounds it (the normed input, the product and the gate
and up halves to x's dtype before the epilogue reads them), and products accumulate in fp32, so the fused step
computes what the unfused one does up to the order of the fp32 sums.

The grid runs over blocks of output rows only; each program holds all B (<= MAX_ROWS) input rows, recomputes
their norms (x is a few KB, read from L2), and walks K in chunks. Up to ELEMENTWISE_ROWS input rows it
accumulates the [B, rows, chunk] products elementwise and reduces them once at the end, with blocks of output
rows small (4 to 32) so that even a 576-row projection at batch 1 spreads over a hundred or more programs: at
these sizes a decode step's product is bound by how many SMs issue loads of the weight, not by arithmetic. With
more input rows the elementwise tile would not fit in registers, and the products are tensor-core dots of
blocks of 16 or more output rows with the input rows padded to 16 or more.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import pdl
from .gdn._triton_compat import patch_interpreter_scalar_index
from .pdl import wait_for_previous

patch_interpreter_scalar_index()
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Input rows one launch holds; a decode step with more sequences takes the norm kernel and the library matmul.
MAX_ROWS = 32
# Input rows up to which the products are elementwise (the [rows, block, chunk] tile stays in registers), past
# which they are tensor-core dots.
ELEMENTWISE_ROWS = 8
# Elements of the [rows, block, chunk] product tile per program (per accumulator): 64 fp32 registers a thread at
# four warps.
_TILE = 8192


@triton.jit
def _matvec_kernel(x, x_stride, norm_w, eps, w, w_stride, residual, out, B, N, K,
                   BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, ADD: tl.constexpr,
                   SILU_MUL: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """out[b, n] for n in this program's block of BN: the product of row n of w (and, with SILU_MUL, of row N + n,
    the up half) with x'[b], then the epilogue. N is the number of output columns. DOT: the products as tensor-core
    dots of the weight tile with x'^T [BK, BB] (BN, BB, BK >= 16; x' in the weight's dtype, exact where x has
    it), else as elementwise products summed at the end. Each chunk of the weight is loaded one chunk ahead of its
    use, the first before waiting for the previous kernel (pdl.py): no kernel writes the weights."""
    b_idx = tl.arange(0, BB)
    b_ok = b_idx < B
    n_idx = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = n_idx < N
    k_idx = tl.arange(0, BK)
    x_rows = x + b_idx.to(tl.int64)[:, None] * x_stride
    w_rows = w + n_idx.to(tl.int64)[:, None] * w_stride
    first_ok = n_ok[:, None] & (k_idx < K)[None, :]
    wk = tl.load(w_rows + k_idx[None, :], mask=first_ok, other=0.0)                              # [BN, BK]
    if SILU_MUL:
        wu = tl.load(w_rows + N * w_stride + k_idx[None, :], mask=first_ok, other=0.0)
    wait_for_previous(PDL)
    if NORM:
        squares = tl.zeros([BB, BK], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + k_idx
            xk = tl.load(x_rows + kk[None, :], mask=b_ok[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
            squares += xk * xk
        inv_rms = 1.0 / tl.sqrt(tl.sum(squares, axis=1) / K + eps)                                   # [BB]
    if DOT:
        acc = tl.zeros([BN, BB], dtype=tl.float32)
        if SILU_MUL:
            acc_up = tl.zeros([BN, BB], dtype=tl.float32)
    else:
        acc = tl.zeros([BB, BN, BK], dtype=tl.float32)
        if SILU_MUL:
            acc_up = tl.zeros([BB, BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + k_idx
        k_ok = kk < K
        xk = tl.load(x_rows + kk[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if NORM:  # the normed input, rounded to x's dtype as the unfused norm's output is
            scale = tl.load(norm_w + kk, mask=k_ok, other=0.0).to(tl.float32)
            xk = (xk * inv_rms[:, None] * scale[None, :]).to(x.dtype.element_ty).to(tl.float32)
        next_k = kk + BK
        next_ok = n_ok[:, None] & (next_k < K)[None, :]  # all false past the last chunk: no memory is read
        wk_next = tl.load(w_rows + next_k[None, :], mask=next_ok, other=0.0)
        if SILU_MUL:
            wu_next = tl.load(w_rows + N * w_stride + next_k[None, :], mask=next_ok, other=0.0)
        if DOT:
            xt = tl.trans(xk.to(w.dtype.element_ty))                                              # [BK, BB]
            acc = tl.dot(wk, xt, acc, input_precision=PRECISION)
            if SILU_MUL:
                acc_up = tl.dot(wu, xt, acc_up, input_precision=PRECISION)
        else:
            acc += xk[:, None, :] * wk.to(tl.float32)[None, :, :]
            if SILU_MUL:
                acc_up += xk[:, None, :] * wu.to(tl.float32)[None, :, :]
        wk = wk_next
        if SILU_MUL:
            wu = wu_next
    if DOT:
        y = tl.trans(acc)                                                                         # [BB, BN]
        if SILU_MUL:
            up = tl.trans(acc_up)
    else:
        y = tl.sum(acc, axis=2)
        if SILU_MUL:
            up = tl.sum(acc_up, axis=2)
    y = y.to(out.dtype.element_ty).to(tl.float32)
    offsets = b_idx.to(tl.int64)[:, None] * N + n_idx[None, :]
    ok = b_ok[:, None] & n_ok[None, :]
    if SILU_MUL:
        up = up.to(out.dtype.element_ty).to(tl.float32)
        y = y * tl.sigmoid(y) * up
    if ADD:
        y = y + tl.load(residual + offsets, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + offsets, y.to(out.dtype.element_ty), mask=ok)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: block sizes as on an H100


def matvec_blocks(rows: int, columns: int, depth: int, sms: int, gated: bool = False) -> tuple[int, int]:
    """(BN, BK): output rows per program, from 4 to 32, the fewest that keep about two programs per SM busy; the
    chunk of K as long as the product tile (two with `gated`) allows, 32 to 1024 and no longer than K needs (a
    program's loads of one chunk are in flight together, the chunks one after another). Past ELEMENTWISE_ROWS
    (dots): 16 to 64 output rows, chunks of 64 (longer ones spill registers at 32 rows)."""
    if rows > ELEMENTWISE_ROWS:
        return min(64, max(16, _pow2(triton.cdiv(columns, 2 * sms)))), 64
    block = min(32, max(4, _pow2(triton.cdiv(columns, 2 * sms))))
    tile = _TILE // (2 if gated else 1)
    chunk = min(1024, max(32, tile // (_pow2(rows) * block)), _pow2(depth))
    return block, chunk


def fused_matvec_applies(batch: int) -> bool:
    """Whether a decode step of `batch` sequences fits one launch of matvec (MAX_ROWS)."""
    return 1 <= batch <= MAX_ROWS


@torch.library.custom_op("oryx::matvec", mutates_args=())
def matvec(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
           residual: torch.Tensor | None = None, silu_mul: bool = False) -> torch.Tensor:
    """x [B, K] (B <= MAX_ROWS, rows of any stride, last axis contiguous) times weight [N, K]^T (rows of any
    stride, last axis contiguous), in x's dtype with fp32 sums (module docstring): x normed first when norm_weight
    [K] is given; with `residual` [B, N] the result plus it; with `silu_mul` the weight is [gate; up] [2F, K]
    and the result SiLU(x' gate^T) * (x' up^T) [B, F]."""
    return launch_matvec(x, weight, norm_weight, eps, residual, silu_mul)


def launch_matvec(x, weight, norm_weight=None, eps=0.0, residual=None, silu_mul=False, block=None, chunk=None,
                  num_warps=4):
    """matvec with the launch's block sizes and warps chosen by the caller (None: matvec_blocks')."""
    B, K = x.shape
    N = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    if not 1 <= B <= MAX_ROWS:
        raise ValueError(f"x: expected 1 to {MAX_ROWS} rows, got {B}")
    if weight.shape[1] != K or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"weight: expected [N, {K}] with contiguous rows, got {tuple(weight.shape)}")
    out = torch.empty(B, N, dtype=x.dtype, device=x.device)
    if residual is not None:
        residual = residual.contiguous()
    default_block, default_chunk = matvec_blocks(B, N, K, _sm_count(x.device), silu_mul)
    block, chunk = block or default_block, chunk or default_chunk
    with_pdl = pdl.applies(x.device)
    # Triton's interpreter computes dots of 16-bit floats wrongly: there elementwise products serve any rows
    dot = B > ELEMENTWISE_ROWS and not (_INTERPRETED and weight.dtype != torch.float32)
    if dot and min(block, chunk) < 16:
        raise ValueError(f"block, chunk: expected >= 16 for {B} rows (tensor-core dots), got {block}, {chunk}")
    _matvec_kernel[(triton.cdiv(N, block),)](
        x, x.stride(0), x if norm_weight is None else norm_weight, eps, weight, weight.stride(0),
        x if residual is None else residual, out, B, N, K, BB=_pow2(B) if not dot else max(16, _pow2(B)),
        BN=block, BK=chunk, NORM=norm_weight is not None, ADD=residual is not None, SILU_MUL=silu_mul, DOT=dot,
        PRECISION="ieee" if weight.dtype == torch.float32 else "tf32", PDL=with_pdl, num_warps=num_warps,
        launch_pdl=with_pdl)
    return out


@matvec.register_fake
def _(x, weight, norm_weight=None, eps=0.0, residual=None, silu_mul=False):
    return x.new_empty(x.shape[0], weight.shape[0] // 2 if silu_mul else weight.shape[0])
