"""The prompt cache: per layer a KV cache, the conv windows and the recurrent state.

Every token appends its key/value and updates the recurrent state whatever its mode, so
a later call may read any earlier token either way. Two `drop` policies give that up when
the plan says a mode does not come back: the KV `drop` frees the keys and values once no
attention-mode token follows (decoding in constant memory), the recurrent-state `drop`
frees the recurrent state once no recurrent-mode token follows, and every later token then
skips the recurrent-only work (q_rec, its conv, the gates, the state update), so attention
mode costs what a plain Transformer costs.

The objects follow mlx-lm's cache protocol where mlx-lm touches it (`state`, `offset`,
`nbytes`), so `mlx_lm.generate` can drive an exported Oryx model with them.
"""
from __future__ import annotations

import mlx.core as mx

KV_GROWTH = 256  # tokens added to the KV buffers at a time, so appending is amortised O(1)
# "auto": drop only a cache the call made itself (no one can read it afterwards); keep a caller's cache
DROP_POLICIES = ("auto", "keep", "drop")


class LayerCache:
    def __init__(self, query_conv_channels: int):
        self.keys = None  # [B, Hkv, capacity, d], RoPE applied
        self.values = None  # [B, Hkv, capacity, dv]
        # the last W-1 inputs of the convs, channels side by side [B, W-1, C]: the recurrent-only ones first
        # (q_rec's; with sharing "kv-proj" also the recurrence's own k, v), then the k, v attention reads; the first
        # query_conv_channels are gone once the recurrent state is dropped
        self.conv = None
        self.query_conv_channels = query_conv_channels
        self.recurrent = None  # [B, H, d, dv] float32, one copy per query head
        self.offset = 0  # tokens seen so far (the next token's position)
        self.kv_dropped = False
        self.recurrent_dropped = False

    def append_kv(self, keys, values):
        """Appends keys [B,Hkv,T,d] and values [B,Hkv,T,dv]; returns all cached ones so far."""
        T = keys.shape[2]
        start = self.offset
        if self.keys is None or start + T > self.keys.shape[2]:
            capacity = -(-(start + T) // KV_GROWTH) * KV_GROWTH  # whole steps of KV_GROWTH holding start + T
            kept = 0 if self.keys is None else start  # the tokens already cached stay at their positions
            new_k = mx.zeros((*keys.shape[:2], capacity - kept, keys.shape[3]), keys.dtype)
            new_v = mx.zeros((*values.shape[:2], capacity - kept, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[:, :, :start], new_k], axis=2)
                self.values = mx.concatenate([self.values[:, :, :start], new_v], axis=2)
        self.keys[:, :, start:start + T] = keys
        self.values[:, :, start:start + T] = values
        return self.keys[:, :, :start + T], self.values[:, :, :start + T]

    def drop_kv(self):
        self.keys = self.values = None
        self.kv_dropped = True

    def drop_recurrent(self):
        """Frees the recurrent state and q_rec's conv window; the k, v windows stay (attention needs them)."""
        self.recurrent = None
        if self.conv is not None and not self.recurrent_dropped:
            self.conv = self.conv[..., self.query_conv_channels:]
        self.recurrent_dropped = True

    @property
    def state(self) -> list[mx.array]:
        """Every array the cache holds (mlx-lm evaluates these between prefill chunks)."""
        arrays = [self.keys, self.values, self.recurrent, self.conv]
        return [a for a in arrays if a is not None]

    @property
    def batch_size(self) -> int | None:
        """Sequences the cache holds (None while empty)."""
        arrays = self.state
        return arrays[0].shape[0] if arrays else None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


def make_prompt_cache(n_layers: int, query_conv_channels: int) -> list[LayerCache]:
    """query_conv_channels: the q_rec channels of a layer's conv window (n_heads * head_dim)."""
    return [LayerCache(query_conv_channels) for _ in range(n_layers)]


def cache_offset(cache: list[LayerCache]) -> int:
    return cache[0].offset if cache else 0


def drop_kv(cache: list[LayerCache]) -> None:
    for layer in cache:
        layer.drop_kv()


def drop_recurrent(cache: list[LayerCache]) -> None:
    for layer in cache:
        layer.drop_recurrent()
