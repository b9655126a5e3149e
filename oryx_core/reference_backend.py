"""The float64 NumPy reference as a backend (oryx_core.backend): a stateless forward only, for `oryx eval`."""
from __future__ import annotations

import numpy as np

from .reference import OryxReference
from .weights import load_checkpoint


class ReferenceModel:
    backend = "reference"
    device = "cpu"
    dtype = "float64"

    def __init__(self, reference: OryxReference):
        self.reference = reference
        self.config = reference.cfg

    def forward(self, tokens: np.ndarray, modes: np.ndarray) -> np.ndarray:
        return self.reference.forward(np.asarray(tokens, dtype=np.int64), np.asarray(modes, dtype=bool))[0]


def load(path, dtype: str | None = None, device: str | None = None) -> ReferenceModel:
    if dtype not in (None, "float64"):
        raise ValueError(f"--dtype: the reference backend computes in float64, got {dtype!r}")
    if device not in (None, "cpu"):
        raise ValueError(f"--device: the reference backend runs on the CPU, got {device!r}")
    ckpt = load_checkpoint(path)
    return ReferenceModel(OryxReference(ckpt.config, ckpt.params))
