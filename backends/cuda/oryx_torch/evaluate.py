"""`oryx eval --backend torch`: the PyTorch model behind oryx_core.evaluate's logits_fn contract."""
from __future__ import annotations

import numpy as np
import torch

from .model import OryxModel


def load_for_eval(path):
    """logits_fn(tokens int64 [B, T], modes bool [T]) -> float32 logits [B, T, V], fp32 on CUDA if present, else CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = OryxModel.from_checkpoint(path, dtype=torch.float32, device=device).eval()

    def logits_fn(tokens: np.ndarray, modes: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = model(torch.from_numpy(np.asarray(tokens, dtype=np.int64)), torch.from_numpy(np.asarray(modes)))
        return logits.float().cpu().numpy()

    return logits_fn
