"""The Metal path: the token-loop kernel for short inputs and decode, the two-launch
chunked kernel for long prefill. `launcher` runs a KernelLaunch (default: on the
GPU through mx.fast.metal_kernel; tests pass the CPU emulator)."""
from __future__ import annotations

import mlx.core as mx

from . import chunked_metal
from ._inputs import Recurrence
from ._launch import Launcher, metal_launcher
from .recurrent_metal import recurrent_launch

# Shorter inputs take the one-launch token loop. The threshold is a guess: the Metal kernels have no timings yet.
CHUNKED_MIN_TOKENS = 64
MAX_CHUNKED_HEAD_DIM = 128  # the prepare kernel keeps a chunk of k in threadgroup memory


def can_chunk(dk: int, dv: int) -> bool:
    return chunked_metal.supports_chunked(dk, dv) and max(dk, dv) <= MAX_CHUNKED_HEAD_DIM


def run_metal(r: Recurrence, chunked: bool | None = None,
              launcher: Launcher = metal_launcher) -> tuple[mx.array, mx.array]:
    """chunked: None picks by length; True demands the chunked kernels."""
    dk, dv = r.k.shape[-1], r.v.shape[-1]
    if chunked is None:
        chunked = r.k.shape[1] >= CHUNKED_MIN_TOKENS and can_chunk(dk, dv)
    if not chunked:
        out, state = launcher(recurrent_launch(*r.args, delta_rule=r.delta_rule))
        return out, state
    if not can_chunk(dk, dv):
        raise ValueError(f"chunked Metal kernels need K, V multiples of 8 and <= 128, got K={dk}, V={dv}")
    prepared = list(launcher(chunked_metal.prepare_launch(
        r.q, r.k, r.v, r.log_decay, r.strength, r.out_scale, delta_rule=r.delta_rule)))
    if not r.delta_rule:
        # Mamba-2 has no W and the scan never reads it; the slot still needs a
        # device buffer (MLX binds arrays under 8 elements as `constant`).
        prepared[1] = prepared[0]
    out, state = launcher(chunked_metal.scan_launch(prepared, r.v, r.skip, r.state, delta_rule=r.delta_rule))
    return out, state
