"""Random initialisation of an Oryx checkpoint, as the design names it."""
from __future__ import annotations

import numpy as np

from .config import OryxConfig
from .spec import parameter_specs

INIT_STD = 0.02
DT_MIN, DT_MAX = 1e-3, 1e-1  # initial step sizes of the recurrences (Mamba-2 / Gated DeltaNet)
A_MIN, A_MAX = 1.0, 16.0  # initial decay rates: A = exp(A_log) ~ U[1, 16]


def inverse_softplus(y):
    return y + np.log(-np.expm1(-y))


def init_params(cfg: OryxConfig, seed: int = 0, names=None) -> dict[str, np.ndarray]:
    """float32 parameters for every tensor of the spec (or, with `names`, a predicate on tensor names,
    for those it accepts, drawn in spec order from the same seed: an import initialising a few gates
    never allocates the rest).

    Projections ~ N(0, 0.02), output projections scaled by 1/sqrt(2 L) (GPT-2), convs
    U(+-1/sqrt(W)) (PyTorch's default for a depthwise conv), norms 1; A_log = log U[1, 16] and
    dt_bias = softplus^-1(dt) with dt log-uniform in [1e-3, 1e-1], as in Mamba-2 and Gated
    DeltaNet; D_skip = 1.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for s in parameter_specs(cfg):
        if names is not None and not names(s.name):
            continue
        if s.init == "normal":
            x = rng.normal(0.0, INIT_STD, s.shape)
        elif s.init == "normal_out":
            x = rng.normal(0.0, INIT_STD / np.sqrt(2 * cfg.n_layers), s.shape)
        elif s.init == "conv":
            bound = 1.0 / np.sqrt(cfg.conv_width)
            x = rng.uniform(-bound, bound, s.shape)
        elif s.init == "ones":
            x = np.ones(s.shape)
        elif s.init == "zeros":
            x = np.zeros(s.shape)
        elif s.init == "A_log":
            x = np.log(rng.uniform(A_MIN, A_MAX, s.shape))
        elif s.init == "dt_bias":
            dt = np.exp(rng.uniform(np.log(DT_MIN), np.log(DT_MAX), s.shape))
            x = inverse_softplus(np.maximum(dt, 1e-4))
        else:
            raise AssertionError(f"unknown init {s.init!r} for {s.name}")
        params[s.name] = x.astype(np.float32)
    return params
