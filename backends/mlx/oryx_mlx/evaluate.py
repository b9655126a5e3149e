"""`oryx eval --backend mlx`: the MLX model as a logits function for oryx_core.evaluate."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from .generate import load_model


def load_for_eval(path):
    model = load_model(path)

    def logits_fn(tokens: np.ndarray, modes: np.ndarray) -> np.ndarray:
        logits = model(mx.array(tokens), modes)
        return np.array(logits.astype(mx.float32))

    return logits_fn
