"""Model builders for the MLX test modules."""
import mlx.core as mx
import numpy as np

from oryx_core.config import preset
from oryx_core.init import init_params
from oryx_core.reference import OryxReference
from oryx_mlx.model import OryxModel


def perturbed_gdn(variant: dict, seed: int):
    """(MLX model, float64 reference) of a tiny GDN preset with `variant`'s overrides, its initial weights moved by
    noise of 0.3 x (their mean size + 0.05), so that no part sits at a value that hides a wrong path."""
    cfg = preset("tiny", "gdn", **variant)
    rng = np.random.default_rng(seed)
    params = {name: (value + rng.normal(0.0, 0.3, value.shape) * (np.abs(value).mean() + 0.05)).astype(np.float32)
              for name, value in init_params(cfg, seed).items()}
    model = OryxModel(cfg)
    model.load_weights([(name, mx.array(value)) for name, value in params.items()], strict=True)
    return model, OryxReference(cfg, params)
