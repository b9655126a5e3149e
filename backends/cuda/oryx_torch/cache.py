"""Inference state of an Oryx model: per layer a KV cache, conv windows and a recurrent state.

Every token appends its key and value and updates the recurrent state whatever its mode
(DESIGN.md), so the mode may switch at any token. Buffers are preallocated at a fixed
`capacity` and updated in place, which keeps their addresses fixed for CUDA graphs.

Either part can be freed once the plan no longer needs it (the policies live in
oryx_core.generation): `drop_kv` frees the keys and values (attention-mode tokens are then
refused; decoding runs in memory independent of context), `drop_recurrent` frees the
recurrent state and q_rec's conv window (recurrent-mode tokens are then refused, and every
later token skips the recurrent-only work). A cache made with `with_kv=False` never
allocates the KV cache.

Layouts: keys [B, Hkv, capacity, d] (RoPE applied), values [B, Hkv, capacity, dv];
conv windows [B, W-1, C] (the last W-1 pre-conv inputs); recurrent state fp32
[B, H, d, dv], one copy per query head (the kernels take equal heads, so each query
head carries its group's state: exact, and no extra memory when H == Hkv).
"""
from __future__ import annotations

import torch

from oryx_core.config import OryxConfig


RECURRENT_WINDOWS = ("q", "k_rec", "v_rec")  # conv windows only the recurrence reads


class LayerCache:
    """One layer's state; the fields mean what the MLX backend's LayerCache's mean: keys, values, conv (the conv
    windows), recurrent (the recurrent state), kv_dropped, recurrent_dropped."""

    def __init__(self, cfg: OryxConfig, batch: int, capacity: int, device, dtype, with_kv: bool):
        self.cfg, self.batch, self.capacity, self.device, self.dtype = cfg, batch, capacity, device, dtype
        self.keys = self.values = self.recurrent = None
        self.conv: dict[str, torch.Tensor] = {}
        self.refill(with_kv)

    def refill(self, with_kv: bool) -> None:
        """Empty again: what a fresh LayerCache holds, with every tensor still here zeroed in place (a captured
        CUDA graph reads it by address) and the parts a drop freed allocated anew (no graph reads those: a
        runner forgets a variant's graph when a drop removes what it reads)."""
        cfg, batch, capacity, device, dtype = self.cfg, self.batch, self.capacity, self.device, self.dtype
        H, Hkv, d, dv, W = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.v_head_dim, cfg.conv_width

        def zeros(old, *shape, dtype=dtype):
            return torch.zeros(*shape, device=device, dtype=dtype) if old is None else old.zero_()

        if with_kv:
            self.keys = zeros(self.keys, batch, Hkv, capacity, d)
            self.values = zeros(self.values, batch, Hkv, capacity, dv)
        # windows of the convs before k_proj, v_proj and the recurrence's query; with sharing "none" or "kv-proj"
        # also of the recurrence's own key and value convolutions (k_rec, v_rec)
        widths = (("k", Hkv * d), ("v", Hkv * dv), ("q", H * d))
        if cfg.recurrent_kv_convs:
            widths += (("k_rec", Hkv * d), ("v_rec", Hkv * dv))
        self.conv = {name: zeros(self.conv.get(name), batch, W - 1, width) for name, width in widths}
        self.recurrent = zeros(self.recurrent, batch, H, d, dv, dtype=torch.float32)

    @property
    def kv_dropped(self) -> bool:
        return self.keys is None

    @property
    def recurrent_dropped(self) -> bool:
        return self.recurrent is None

    def tensors(self) -> list[torch.Tensor]:
        kv = [] if self.keys is None else [self.keys, self.values]
        return kv + list(self.conv.values()) + ([] if self.recurrent is None else [self.recurrent])


class OryxCache:
    """All layers' inference state for `batch` sequences of up to `capacity` tokens."""

    def __init__(self, cfg: OryxConfig, batch: int, capacity: int, device="cpu", dtype=torch.float32,
                 with_kv: bool = True):
        if batch < 1 or capacity < 1:
            raise ValueError(f"cache: batch and capacity must be >= 1, got batch={batch}, capacity={capacity}")
        self.cfg, self.batch, self.capacity, self.with_kv = cfg, batch, capacity, with_kv
        self.layers = [LayerCache(cfg, batch, capacity, device, dtype, with_kv) for _ in range(cfg.n_layers)]
        self.length = 0  # tokens seen so far (host copy)
        # The same count on the device, per sequence: what graph-captured steps read and advance.
        self.position = torch.zeros(batch, dtype=torch.int64, device=device)
        # True when the sequences may sit at different positions (batched serving): decoding then
        # rotates each sequence by its own position; `length` is then only a bound.
        self.ragged = False

    @property
    def has_kv(self) -> bool:
        return self.layers[0].keys is not None

    @property
    def has_recurrent(self) -> bool:
        return self.layers[0].recurrent is not None

    def reserve(self, new_tokens: int) -> None:
        """Checks that `new_tokens` more tokens fit."""
        if self.length + new_tokens > self.capacity:
            raise ValueError(f"cache: {self.length} + {new_tokens} tokens exceed its capacity {self.capacity}; "
                             f"make the cache with a larger capacity")

    def advance(self, tokens: int) -> None:
        self.length += tokens
        self.position.add_(tokens)

    def drop_kv(self) -> None:
        """Frees every layer's KV cache (attention-mode tokens are then refused)."""
        for layer in self.layers:
            layer.keys = layer.values = None

    def drop_recurrent(self) -> None:
        """Frees every layer's recurrent state and the conv windows only it reads (recurrent-mode tokens are then
        refused)."""
        for layer in self.layers:
            layer.recurrent = None
            for name in RECURRENT_WINDOWS:
                layer.conv.pop(name, None)

    def refill(self) -> None:
        """Empty again, as made (LayerCache.refill): no tokens seen, every part zeroed, dropped parts back."""
        for layer in self.layers:
            layer.refill(self.with_kv)
        self.length = 0
        self.position.zero_()
        self.ragged = False

    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self.layers for t in layer.tensors())
