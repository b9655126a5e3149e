"""Model parameters for tests, shared by the backends' test modules."""
import numpy as np

from oryx_core.init import init_params


def lively_params(cfg, seed):
    """Fresh random parameters with projections large enough that every part changes the logits."""
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed)
    for name, p in params.items():
        if p.ndim == 2 and "conv" not in name:
            params[name] = rng.normal(0.0, 0.6 / np.sqrt(p.shape[1]), p.shape).astype(np.float32)
        elif name.endswith(("norm.weight", "D_skip")) or name.endswith(".bias"):
            params[name] = rng.uniform(0.5, 1.5, p.shape).astype(np.float32)
    return params
