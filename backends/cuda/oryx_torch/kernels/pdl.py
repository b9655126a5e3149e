"""Programmatic dependent launch (Hopper and later) for the decode step's kernels.

A decode token at batch 1 is a chain of ~170 small kernels, each bound by latency: the launch, the first round of
loads, the tail. With programmatic dependent launch a kernel may start while the kernel before it is still
running; it first loads what no earlier kernel of the chain is writing (weights, and state last written by a
kernel two or more places back), then waits for its predecessor (`griddepcontrol.wait`: the predecessor has
completed and its writes are visible), then lets its own successor launch, then does the rest.

The invariants every kernel launched this way keeps, which make the chain as ordered as plain stream order:
- every program calls wait_for_previous, and writes nothing before it (a predecessor may still read what it
  would overwrite);
- before it, it reads only data that its immediate predecessor does not write: the successor is released only
  after the wait, so when a kernel starts, every kernel before its predecessor has completed;
- kernels that are not launched this way (torch's, cuBLAS's) keep plain stream order on both sides.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# Whether decode kernels use programmatic dependent launch where the card has it; read at every launch (a
# captured CUDA graph keeps what it was captured with). On unless ORYX_PDL=0.
ENABLED = os.environ.get("ORYX_PDL", "1") == "1"


@functools.cache
def _card_has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def applies(device: torch.device) -> bool:
    """Whether a kernel launched on `device` takes programmatic dependent launch: ENABLED, a CUDA device of compute
    capability 9.0 or more, not Triton's interpreter (which has no such launch)."""
    if not ENABLED or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _card_has_pdl(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel in the stream has completed and its writes are visible, then let
    the next kernel launch. Without: nothing (plain stream order already holds)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
