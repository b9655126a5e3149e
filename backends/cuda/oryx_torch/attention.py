"""Causal grouped-query attention under a mode plan: only attention-mode queries attend.

Every token's key and value exist (they are shared with the recurrence), but only the
query rows whose token runs in attention mode are needed. Layout throughout is
head-major: q [B, H, T, d], k [B, Hkv, S, d], v [B, Hkv, S, dv] -> out [B, H, T, dv],
with query t at absolute position `q_offset + t` (q_offset = S - T when a cache holds
earlier keys) and key s at position s. Rows of tokens in recurrent mode are left as
whatever is cheapest (zeros or a full causal row): the caller picks each token's
readout, so they are never read.

- CUDA: SDPA (flash) when every query attends; otherwise (MIXED_ATTENTION) causal SDPA
  over every row, or FlexAttention under a block mask built from the plan on the host
  (once per forward) that skips the query blocks holding no attention token: either over
  the rows as they are ("flex") or over each sequence's attention rows moved to its first
  rows ("packed", so a 128-row block is never only partly needed because its sequence
  switches mode inside it).
- CPU: SDPA over just the attention rows, with an explicit causal mask.
- Decoding: one query against a preallocated cache, masked by the current position
  (no host sync, so it can be captured in a CUDA graph).
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

FLEX_BLOCK = 128  # FlexAttention's default tile: the plan's granularity for skipping work
# How CUDA computes a plan that mixes modes: "flex" (FlexAttention over the query blocks that hold an
# attention token), "packed" (FlexAttention over each sequence's attention rows gathered to its first rows,
# the output gathered back), "dense" (causal SDPA over every row; the recurrent rows are computed and unused;
# from position 0 only, else "flex") or "auto" (dense when the packed blocks cover at least DENSE_FROM of the
# causal score matrix, else packed). A FlexAttention block costs about 3 flash ones in a compiled training step
# at SmolLM2-135M's shape, but packing skips most blocks: in the 30-layer compiled step under the training
# sampler's plans (half the 64-token chunks in attention) packed is the faster (docs/benchmarks.md).
MIXED_ATTENTION = "packed"
MIXED_ATTENTION_METHODS = ("dense", "packed", "flex", "auto")
DENSE_FROM = 0.3
# Whether the CPU takes the CUDA path's choice (FlexAttention eagerly, without backward) instead of SDPA over
# the attention rows: for tests of the CUDA path on a machine without one.
FLEX_ON_CPU = False
# (dtype, device type, query heads, key/value heads, key width, value width) for which compiling FlexAttention
# failed in this process (torch 2.11 on an H100 found no kernel configuration for some small fp32 heads): those
# plans attend through SDPA over their attention rows (_rows_attention), the same result, without retrying.
FLEX_FAILED: set = set()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the last axis; x [..., T, H, d], tables [T, d] from rope_tables.

    With x = [x1, x2]: out = [x1 c - x2 s, x2 c + x1 s] = x * [c, c] + [x2, x1] * [-s, s],
    four element-wise kernels, in fp32 through type promotion against the fp32 tables.
    Eager CUDA calls on [B, T, H, d] take kernels.rope.fused_rope instead (one launch each
    way); under torch.compile inductor fuses this form itself.
    """
    if _fused_rope_applies(x, cos):
        from .kernels.rope import fused_rope
        return fused_rope(x, cos, sin)
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return torch.addcmul(x * cos[:, None, :], swapped, sin[:, None, :]).to(x.dtype)


def _fused_rope_applies(x, cos):
    # the kernel computes in fp32, as this form does for 16- and 32-bit inputs (not for fp64 ones)
    return (x.is_cuda and x.dtype != torch.float64 and x.dim() == 4 and cos.shape == (x.shape[1], x.shape[3])
            and x.shape[3] & (x.shape[3] - 1) == 0 and not torch.compiler.is_compiling())


def rope_tables(head_dim: int, theta: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([c, c], [-s, s]) fp32 [T, d] for integer positions [T]; angles in float64 so long contexts keep precision."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


class AttentionPlan:
    """The mode facts one forward pass needs, computed once and shared by every layer.

    modes [B, T] bool (True = attention) on the compute device, for queries at positions
    q_offset..q_offset+T-1. `host_modes`, the same on the CPU when the caller has them
    (plans usually come from numpy), lets the flags and the FlexAttention block mask be
    worked out on the host: no device sync, and no run of tiny GPU launches per forward.
    The block mask is built on first use and reused by later layers.
    """

    def __init__(self, modes: torch.Tensor, q_offset: int = 0, host_modes: torch.Tensor | None = None):
        self.modes, self.q_offset = modes, q_offset
        self._source = host_modes if host_modes is not None else modes
        self._block_masks, self._packed, self._rows, self._active_area = {}, {}, None, None
        self._auto_dense = None  # MIXED_ATTENTION = "auto"'s choice, made once on the host (a bool dynamo guards on)
        # Inside torch.compile the mode values are data, not constants: a plan built there is "traced",
        # assumes both modes occur and attends on every row (the caller keeps each token's own readout),
        # so one graph serves every plan. A plan built before the compiled call (then `prepare`d) keeps
        # its exact flags, attention rows and block masks, and dynamo guards on the flags.
        self.traced = torch.compiler.is_compiling()
        if self.traced:
            self.any_attention, self.all_attention = True, False
            return
        any_attention, all_attention = torch.stack([self._source.any(), self._source.all()]).tolist()
        self.any_attention, self.all_attention = bool(any_attention), bool(all_attention)

    @property
    def any_recurrent(self) -> bool:
        return not self.all_attention

    def block_mask(self, kv_len: int):
        """The FlexAttention mask for `kv_len` keys; None inside torch.compile unless `prepare` built it."""
        if kv_len not in self._block_masks:
            if torch.compiler.is_compiling():
                return None
            self._block_masks[kv_len] = plan_block_mask(self._source, kv_len, self.q_offset, self.modes.device)
        return self._block_masks[kv_len]

    def active_area(self, block: int = FLEX_BLOCK) -> float:
        """The fraction of the causal score matrix (in query blocks of `block` rows, summed over the batch) that
        FlexAttention computes: the blocks holding an attention token, each weighted by the key blocks it reads."""
        if self._active_area is None:
            B, T = self._source.shape
            n_q = -(-T // block)
            padded = torch.zeros(B, n_q * block, dtype=torch.bool)
            padded[:, :T] = self._source.cpu()
            active = padded.view(B, n_q, block).any(-1)
            weight = torch.arange(1, n_q + 1, dtype=torch.float64) + self.q_offset / block
            self._active_area = float((active * weight).sum() / (weight.sum() * B))
        return self._active_area

    def packed_rows(self, kv_len: int) -> "PackedRows | None":
        """The packed layout and its FlexAttention mask for `kv_len` keys; None inside torch.compile unless
        `prepare` built it."""
        if kv_len not in self._packed:
            if torch.compiler.is_compiling():
                return None
            self._packed[kv_len] = plan_packed_rows(self._source, kv_len, self.q_offset, self.modes.device)
        return self._packed[kv_len]

    def method(self) -> str:
        """How the CUDA path attends under this plan: "dense" (causal SDPA over every row), "flex" or "packed"
        (MIXED_ATTENTION; "auto" decides by the share of the causal score matrix the packed blocks cover)."""
        if self.traced:
            return "flex"  # no host tables: plan_attention attends on every row
        if self.q_offset == 0 and self.all_attention:
            return "dense"
        if MIXED_ATTENTION == "flex" or (MIXED_ATTENTION == "dense" and self.q_offset != 0):
            return "flex"
        if MIXED_ATTENTION == "dense":
            return "dense"
        if MIXED_ATTENTION == "auto" and self.q_offset == 0:
            if self._auto_dense is None:
                packed = self.packed_rows(self.modes.shape[1])
                if packed is None:  # not prepared, inside torch.compile: plan_attention attends on every row
                    return "packed"
                self._auto_dense = packed.area >= DENSE_FROM
            return "dense" if self._auto_dense else "packed"
        return "packed"

    def dense_attention(self) -> bool:
        """Whether CUDA computes this plan's attention with causal SDPA over every row (MIXED_ATTENTION)."""
        return self.method() == "dense"

    def attention_rows(self):
        """Indices [R] of the query rows any sequence runs in attention mode (None: every row).

        Worked out on the host copy of the modes when there is one; inside torch.compile only
        a `prepare`d plan has them (a data-dependent count cannot be traced without a break).
        """
        if self._rows is None and not self.traced and not torch.compiler.is_compiling():
            rows = torch.nonzero(self._source.any(0)).flatten()
            self._rows = rows.to(self.modes.device)
        return self._rows

    def prepare(self, kv_len: int | None = None) -> "AttentionPlan":
        """Builds, outside any compiled region, what `plan_attention` reads for `kv_len` keys (default:
        q_offset + T): the block mask on CUDA, the attention rows elsewhere. Returns self."""
        if self.traced:
            raise ValueError("plan: a plan built inside torch.compile cannot be prepared; build it before the call")
        kv_len = self.q_offset + self.modes.shape[1] if kv_len is None else kv_len
        if self.modes.is_cuda or FLEX_ON_CPU:
            if self.any_attention and not (self.q_offset == 0 and self.all_attention):
                method = self.method()  # "auto" decides on the host now
                if method == "flex":
                    self.block_mask(kv_len)
                elif method == "packed":
                    self.packed_rows(kv_len)
        else:
            self.attention_rows()
        return self


def plan_attention(q, k, v, plan: AttentionPlan, scale: float | None = None):
    """Causal GQA attention computed for the rows whose plan.modes [B, T] is True."""
    B, H, T, d = q.shape
    if plan.modes.shape != (B, T):
        raise ValueError(f"plan.modes must be [B, T] = {[B, T]}, got {list(plan.modes.shape)}")
    scale = d ** -0.5 if scale is None else scale
    if q.is_cuda or FLEX_ON_CPU:
        method = plan.method()
        if method == "dense":
            return causal_sdpa(q, k, v, scale)
        tracing = torch.compiler.is_compiling()
        flex = flex_attention_function() if tracing or not q.is_cuda else _compiled_flex_attention()
        grouped = H != k.shape[1]
        dv = v.shape[-1]
        signature = (q.dtype, q.device.type, H, k.shape[1], d, dv)
        unpadded = q, k, v
        if not tracing and signature in FLEX_FAILED:  # compiling FlexAttention failed for these heads before
            return _rows_attention(*unpadded, plan.attention_rows(), plan.q_offset, scale)
        q, k, v = equal_head_dims(q, k, v)
        try:
            if method == "packed" and (packed := plan.packed_rows(k.shape[2])) is not None:
                rows = _PermuteRows.apply(q, packed.order, packed.inverse)
                out = flex(rows, k, v, block_mask=packed.block_mask, scale=scale, enable_gqa=grouped)
                return _PermuteRows.apply(out, packed.inverse, packed.order)[..., :dv]
            block_mask = plan.block_mask(k.shape[2])
            if block_mask is None:  # traced plan: every row attends
                return _rows_attention(q, k, v, None, plan.q_offset, scale)[..., :dv]
            return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=grouped)[..., :dv]
        except _compile_errors() as error:
            if tracing:  # inside an enclosing compile the failure is that compile's to report
                raise
            FLEX_FAILED.add(signature)
            warnings.warn(f"attention: compiled FlexAttention failed for {signature[0]} heads {H}/{k.shape[1]} of "
                          f"{d}/{dv} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); these heads "
                          f"attend through SDPA over the attention rows from now on", RuntimeWarning, stacklevel=2)
            return _rows_attention(*unpadded, plan.attention_rows(), plan.q_offset, scale)
    if plan.q_offset == 0 and plan.all_attention:  # every row attends: no row gather, no explicit mask
        return causal_sdpa(q, k, v, scale)
    return _rows_attention(q, k, v, plan.attention_rows(), plan.q_offset, scale)


def equal_head_dims(q, k, v):
    """q, k and v zero-padded to one head size, the larger of the two, for the fused kernels: SDPA's flash
    kernels want them equal, and compiled FlexAttention on CUDA (torch 2.11) found no kernel configuration for a
    65-row query block with 32-wide key heads and 16-wide value heads. Zero columns change no score (q.k); the
    caller slices the padded value columns off."""
    d, dv = q.shape[-1], v.shape[-1]
    if d < dv:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    elif dv < d:
        v = F.pad(v, (0, d - dv))
    return q, k, v


def causal_sdpa(q, k, v, scale):
    """Causal SDPA over heads padded to one size (equal_head_dims)."""
    dv = v.shape[-1]
    q, k, v = equal_head_dims(q, k, v)
    grouped = q.shape[1] != k.shape[1]
    if grouped and q.dtype == torch.float32 and q.is_cuda:
        # No fused CUDA kernel takes fp32 with grouped heads (flash and cuDNN need 16-bit inputs, the
        # memory-efficient kernel has no GQA): expand the kv heads rather than fall back to math.
        # The CPU's flash kernel takes grouped heads in fp32.
        group = q.shape[1] // k.shape[1]
        k, v, grouped = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), False
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=grouped)
    return out[..., :dv]


def _rows_attention(q, k, v, rows, q_offset, scale):
    """Plain SDPA over only the query rows `rows` [R] (None: all of them); the other rows stay zero."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    if rows is None:
        if q_offset == 0:
            return causal_sdpa(q, k, v, scale)
        rows = torch.arange(T, device=q.device)
    out = q.new_zeros(B, H, T, v.shape[-1])
    if rows.numel() == 0:
        return out
    causal = torch.arange(S, device=q.device)[None, :] <= (rows + q_offset)[:, None]  # [rows, S]
    picked = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=causal, scale=scale,
                                            enable_gqa=H != k.shape[1])
    out[:, :, rows] = picked
    return out


def _compile_errors() -> tuple:
    """The exceptions a compiled call raises when compiling (not running) fails: dynamo's backend failure and
    inductor's lowering errors (torch 2.11 raises InductorError, e.g. for a FlexAttention with no valid kernel
    configuration)."""
    import torch._dynamo.exc
    import torch._inductor.exc

    errors = [torch._dynamo.exc.BackendCompilerFailed]
    inductor_error = getattr(torch._inductor.exc, "InductorError", None)
    if inductor_error is not None:
        errors.append(inductor_error)
    return tuple(errors)


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention_function())


def flex_attention_function():
    """FlexAttention itself: inside an enclosing torch.compile it is traced into that graph."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def plan_block_mask(query_modes: torch.Tensor, kv_len: int, q_offset: int = 0, device=None,
                    block: int = FLEX_BLOCK):
    """A FlexAttention BlockMask for causal attention restricted to query blocks holding an attention token.

    Built directly from block-level tables (no dense [T, S] mask): for query block i,
    key blocks entirely at or before its first query are "full" (no masking needed),
    the ones straddling the diagonal are "partial" (the causal mask_mod applies), and
    everything is empty when no token of the block is in attention mode. The transposed
    (per key block) tables that the backward pass reads come from the same matrices.
    The tables are a few NumPy operations on the host and reach `device` in one copy:
    built with torch ops (or by BlockMask.from_kv_blocks, whose vmapped scatter rebuilds
    the transposed tables) they cost milliseconds per mask, on the GPU as on the CPU.
    """
    B, T = query_modes.shape
    device = query_modes.device if device is None else torch.device(device)
    n_q = -(-T // block)
    padded = np.zeros((B, n_q * block), dtype=bool)
    padded[:, :T] = query_modes.cpu().numpy()
    active = padded.reshape(B, n_q, block).any(-1)                                 # [B, n_q]
    q_first = q_offset + np.arange(n_q) * block
    q_last = np.minimum(q_first + block - 1, q_offset + T - 1)
    tables = _block_tables(active, np.broadcast_to(q_first, (B, n_q)), np.broadcast_to(q_last, (B, n_q)),
                           kv_len, block)
    return _block_mask(tables, _to_device(np.concatenate([t.ravel() for t in tables]), device), T, kv_len, block,
                       _causal_mask_mod(q_offset, device))


class PackedRows(NamedTuple):
    """A plan's attention rows moved to the front of each sequence: packed row j of sequence b is row
    order[b, j] (its attention rows first, in order, then the others); inverse undoes order. block_mask is
    FlexAttention's mask over the packed rows (each attends the keys up to its own position, the rows after
    the attention rows none); area the share of the causal score matrix its blocks cover."""
    order: torch.Tensor      # [B, T] int64
    inverse: torch.Tensor    # [B, T] int64
    block_mask: object
    area: float


def plan_packed_rows(query_modes: torch.Tensor, kv_len: int, q_offset: int = 0, device=None,
                     block: int = FLEX_BLOCK) -> PackedRows:
    """The packed layout of a plan's attention rows, worked out on the host (as plan_block_mask).

    A query block of packed rows holds attention rows only (but for the last one of a sequence), so the
    blocks computed are about the attention rows' share of the causal score matrix whatever the plan's
    chunk size; the keys a block reads run from 0 to its last row's position, its first row's position
    bounding the blocks that need no mask.
    """
    B, T = query_modes.shape
    device = query_modes.device if device is None else torch.device(device)
    modes = query_modes.cpu().numpy().astype(bool)
    order = np.argsort(~modes, axis=1, kind="stable")                              # [B, T]
    inverse = np.argsort(order, axis=1, kind="stable")
    counts = modes.sum(1)                                                          # attention rows per sequence
    n_q = -(-T // block)
    positions = np.full((B, n_q * block), -1, dtype=np.int64)                      # -1: attends to nothing
    attends = np.arange(T)[None, :] < counts[:, None]
    positions[:, :T] = np.where(attends, order + q_offset, -1)
    first_row = np.arange(n_q) * block
    active = first_row[None, :] < counts[:, None]                                  # [B, n_q]
    last_row = np.clip(np.minimum(first_row[None, :] + block, counts[:, None]) - 1, 0, None)
    q_first = positions[:, first_row]
    q_last = np.take_along_axis(positions, last_row, axis=1)
    tables = _block_tables(active, q_first, q_last, kv_len, block)
    causal_blocks = (np.minimum(q_offset + np.minimum(first_row + block, T) - 1, kv_len - 1) // block + 1).sum()
    area = float(tables[0].sum() + tables[2].sum()) / float(B * causal_blocks)
    # the positions cover whole blocks: the kernels may read the mask of rows past T in a sequence's last block
    int32 = _to_device(np.concatenate([t.ravel() for t in tables] + [positions.astype(np.int32).ravel()]), device)
    int64 = _to_device(np.concatenate([order.ravel(), inverse.ravel()]), device)
    order_d, inverse_d = (piece.view(B, T) for piece in int64.split(B * T))
    position_d = int32[-positions.size:].view(positions.shape)
    mask = _block_mask(tables, int32[:-positions.size], T, kv_len, block, _packed_mask_mod(position_d))
    return PackedRows(order_d, inverse_d, mask, area)


def _packed_mask_mod(positions: torch.Tensor):
    return lambda b, h, q_idx, kv_idx: kv_idx <= positions[b, q_idx]


class _PermuteRows(torch.autograd.Function):
    """x [B, H, T, e] with row t of sequence b taken from row order[b, t]; `inverse` is order's inverse, so
    the gradient is the inverse gather (no scatter)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return _gather_rows(x, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _gather_rows(grad, inverse), None, None


def _gather_rows(x, index):
    B, H, _, e = x.shape
    return x.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], e))


def _block_tables(active, q_first, q_last, kv_len: int, block: int) -> list[np.ndarray]:
    """FlexAttention's eight block tables for query blocks [B, n_q] that are `active` and hold queries at
    positions q_first..q_last (each block's least and greatest), causal over kv_len keys: key blocks wholly
    at or before q_first are full, the others up to q_last partial (their mask applies)."""
    n_kv = -(-kv_len // block)
    kv_first = np.arange(n_kv) * block
    kv_last = np.minimum(kv_first + block - 1, kv_len - 1)
    full = (kv_last[None, None, :] <= q_first[:, :, None]) & active[:, :, None]            # [B, n_q, n_kv]
    partial = (kv_first[None, None, :] <= q_last[:, :, None]) & active[:, :, None] & ~full
    return [*_block_lists(partial), *_block_lists(full),
            *_block_lists(partial.transpose(0, 2, 1)), *_block_lists(full.transpose(0, 2, 1))]


def _block_mask(tables: list[np.ndarray], flat: torch.Tensor, T: int, kv_len: int, block: int, mask_mod):
    """The BlockMask over `tables` (as _block_tables returns them), whose values are `flat` on the device."""
    from torch.nn.attention.flex_attention import BlockMask

    on_device = [piece.view(t.shape) for piece, t in zip(flat.split([t.size for t in tables]), tables)]
    kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx = on_device
    return BlockMask(seq_lengths=(T, kv_len), kv_num_blocks=kv_num, kv_indices=kv_idx,
                     full_kv_num_blocks=full_kv_num, full_kv_indices=full_kv_idx, q_num_blocks=q_num,
                     q_indices=q_idx, full_q_num_blocks=full_q_num, full_q_indices=full_q_idx,
                     BLOCK_SIZE=(block, block), mask_mod=mask_mod)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """The host array on `device` without waiting for the GPU.

    A copy from pageable host memory first waits for all work queued on the stream, which would
    make every forward with a new plan drain the GPU; staged in pinned memory the copy is queued
    like a kernel. (PyTorch's pinned-memory cache keeps the staging block until the copy is done.)
    Under torch.compile the plain copy stays: that is the form the compiled training runs used.
    """
    host = torch.from_numpy(array)
    if device.type != "cuda" or torch.compiler.is_compiling():
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _causal_mask_mod(q_offset: int, device):
    if q_offset == 0:
        return lambda b, h, q_idx, kv_idx: kv_idx <= q_idx
    offset = torch.full((), q_offset, dtype=torch.int64, device=device)  # a tensor: new offsets need no recompile
    return lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + offset


def _block_lists(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[B, rows, cols] bool -> (counts [B, 1, rows], indices [B, 1, rows, cols]) int32, the True columns first, in order."""
    counts = blocks.sum(-1, dtype=np.int32)
    indices = np.argsort(~blocks, axis=-1, kind="stable").astype(np.int32)
    return counts[:, None], indices[:, None]


def decode_attention(q, k_cache, v_cache, position: torch.Tensor, scale: float):
    """One query per sequence against a preallocated cache: q [B, H, d], caches [B, Hkv, capacity, *].

    Keys at slots <= position[b] are valid (the current token's key is already written).
    Reads the whole capacity under a mask, so its shapes never change between tokens.
    """
    B, H, d = q.shape
    Hkv, capacity = k_cache.shape[1], k_cache.shape[2]
    grouped = q.view(B, Hkv, H // Hkv, d)
    scores = torch.matmul(grouped, k_cache.transpose(-1, -2)).float() * scale           # [B, Hkv, G, capacity]
    valid = torch.arange(capacity, device=q.device)[None, :] <= position[:, None]       # [B, capacity]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(v_cache.dtype)
    return torch.matmul(weights, v_cache).reshape(B, H, v_cache.shape[-1])
